"""Tied SpikeSEG decoder (no parameters of its own) and the mask window.

For one step's classification spikes S3 and the same step's pooling indices::

    D3 = conv_transpose2d(S3_k, W3, padding=3)                   for each class k separately
    U2 = max_unpool2d(D3, idx2, 2, output_size=(H2, W2))   [* S2 if gate]
    D2 = conv_transpose2d(U2, W2, padding=2)
    U1 = max_unpool2d(D2, idx1, 2, output_size=(H1, W1))   [* S1 if gate]
    D1 = conv_transpose2d(U1, W1, padding=2)
    saliency_k = sum over C_in of D1                              (n_classes, H, W)
    mask = 0 where max_k saliency_k <= decoder_threshold, else 1 + argmax_k saliency_k   (uint8)

Classes are decoded separately by putting class k alone in batch row k (one pass for all
classes).  The gate (``decoder_gate``, default on) multiplies each unpooled map by the
encoder's pre-pool spikes of the same step, so the mask follows the pixels that actually
spiked rather than the whole dilated receptive field; without it one Conv3 spike lights a
~40x40 pixel square, which swallows small objects (satellites) into blobs.

No class spike means an empty mask: :func:`decode_mask` is only worth calling when
``has_spikes``; the node checks that flag (one host sync per step on the 0-dim bool; on
CPU that costs nothing, on CUDA it is the one sync we accept besides copying the mask).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import Tensor

from .encoder import EncoderOutput


def _unpool(d: Tensor, idx: Tensor, size: tuple[int, int], n_rep: int) -> Tensor:
    """max_unpool2d of ``d`` (n_rep * B, C, h, w) with indices (B, C, h, w) repeated per class."""
    if n_rep > 1:
        idx = idx.repeat(n_rep, 1, 1, 1)
    return F.max_unpool2d(d, idx, 2, stride=2, output_size=size)


def _transposed_conv_few_in(x: Tensor, w: Tensor, padding: int) -> Tensor:
    """``conv_transpose2d(x, w, padding=padding)`` for few input channels (the classes) and many
    outputs (W3: n_classes -> 36).  On CPU, as the equivalent forward conv with the flipped
    kernel: torch's CPU transposed conv builds a (C_out * k * k, H * W) column buffer there
    (87 ms against 5.7 ms at 346x260 in float64).  The same products and sums, exact on the
    weight grid, so the result is identical."""
    if x.device.type != "cpu":
        return F.conv_transpose2d(x, w, padding=padding)
    k = w.shape[-1]
    return F.conv2d(x, w.flip(2, 3).transpose(0, 1), padding=k - 1 - padding)


def decode_saliency(out: EncoderOutput, w1: Tensor, w2: Tensor, w3: Tensor, gate: bool) -> Tensor:
    """Per-class saliency (B, n_classes, H, W), float64, for one step (equations in the module docstring).

    float64 on purpose: with weights on the 2^-12 grid (``model.encoder.quantize_weights``)
    every product and partial sum of the decoder is exact in float64 (not in float32), so
    the dense, cropped (instances) and event-driven decoders agree bit for bit, also on
    the sign of a saliency that the signed W1 cancels to 0.  It runs only on steps where
    Conv3 fired; the alternative (float32 plus an epsilon band around 0) changes the mask.
    """
    w1, w2, w3 = w1.double(), w2.double(), w3.double()
    s3 = out.classification_spikes.double()
    b, n, h3, w3s = s3.shape
    idx1, idx2 = out.pooling_indices
    size1, size2 = out.pooling_output_sizes
    if n == 1:
        x = s3
    else:
        # row (k, b) holds class k of stream b only: x[k*B + b, c] = s3[b, c] * (c == k)
        eye = torch.eye(n, dtype=s3.dtype, device=s3.device)
        x = (eye[:, None, :, None, None] * s3[None]).reshape(n * b, n, h3, w3s)
    d = _transposed_conv_few_in(x, w3, 3)
    d = _unpool(d, idx2, size2, n)
    if gate:
        d = d * out.layer_spikes["conv2"].double().repeat(n, 1, 1, 1)
    d = F.conv_transpose2d(d, w2, padding=2)
    d = _unpool(d, idx1, size1, n)
    if gate:
        d = d * out.layer_spikes["conv1"].double().repeat(n, 1, 1, 1)
    # the polarity sum taken on W1 first (linear and exact on the grid): half the last conv
    sal = F.conv_transpose2d(d, w1.sum(1, keepdim=True), padding=2)[:, 0]  # (n * B, H, W), row k*B + b
    return sal.reshape(n, b, *sal.shape[-2:]).transpose(0, 1)


def saliency_to_mask(sal: Tensor, threshold: float) -> Tensor:
    """(B, n, H, W) saliency -> (B, H, W) uint8: 0 where max <= threshold, else 1 + argmax class."""
    best, cls = sal.max(dim=1)
    return torch.where(best > threshold, cls + 1, torch.zeros_like(cls)).to(torch.uint8)


def decode_mask(out: EncoderOutput, w1: Tensor, w2: Tensor, w3: Tensor, gate: bool, threshold: float) -> Tensor:
    """One step's raw mask (B, H, W) uint8 (see module docstring)."""
    return saliency_to_mask(decode_saliency(out, w1, w2, w3, gate), threshold)


def decode_mask_crops(
    out: EncoderOutput, w1: Tensor, w2: Tensor, w3: Tensor, gate: bool, threshold: float, chunk: int = 512
) -> Tensor:
    """:func:`decode_mask` computed from each Conv3 spike's 40 x 40 crop, summed: same masks (R, H, W).

    The decoder is linear in S3, so the saliency is the sum over spikes of each spike's
    saliency (:func:`model.instances.spike_crops`), which is non-zero only in the crop
    the spike can reach.  The crops are added into a zero canvas (``index_put_`` with
    accumulate); float64 sums of weights on the 2^-12 grid are exact, so the order of
    accumulation cannot change a bit and the mask equals the full-frame decoder's.
    Why: the full-frame float64 decode costs 20-30 ms per step at 346x260 on this CPU (no
    float64 MKL-DNN kernels) and ~0.3 ms on an H100 (cuDNN dgrad in float64); a crop costs
    ~0.4 MMAC, ~0.45 ms on this CPU, so crops win on CPU only for steps with few spikes (the
    node picks per step: ``model.node.CROP_PIXELS_PER_SPIKE``).  ``chunk`` spikes at a time
    bound the memory.
    """
    from .instances import spike_crops

    s3 = out.classification_spikes
    r_n, n_cls = s3.shape[:2]
    h, w = out.pooling_output_sizes[0]
    canvas = torch.zeros((r_n, n_cls, h + 40, w + 40), dtype=torch.float64, device=s3.device)
    nz = torch.nonzero(s3 > 0)  # (B, 4): row, class, y, x
    for a in range(0, nz.shape[0], chunk):
        z = nz[a : a + chunk]
        b = z.shape[0]
        sal, py, px = spike_crops(out, w1, w2, w3, gate, z[:, 0], z[:, 2], z[:, 3], z[:, 1])
        ri = z[:, 0, None, None].expand(b, 40, 40)
        ki = z[:, 1, None, None].expand(b, 40, 40)
        yi = (py + 18)[:, :, None].expand(b, 40, 40)
        xi = (px + 18)[:, None, :].expand(b, 40, 40)
        canvas.index_put_((ri, ki, yi, xi), sal, accumulate=True)
    return saliency_to_mask(canvas[:, :, 18 : 18 + h, 18 : 18 + w], threshold)


class MaskWindowState(NamedTuple):
    """Mask window memory: ``union`` keeps the last N raw masks, ``decay`` a per-class presence map."""

    recent: tuple[Tensor, ...]
    presence: Tensor | None


def window_step(
    raw: Tensor,
    state: MaskWindowState | None,
    n: int,
    mode: Literal["union", "decay"],
    decay: float,
    n_classes: int,
) -> tuple[Tensor, MaskWindowState]:
    """Combine the raw mask (H, W) uint8 of this step with the last ones.

    union: a pixel lit in any of the last ``n`` raw masks keeps the class of its newest lighting.
    decay: ``A_k <- decay * A_k + [raw == k]``; pixel = 1 + argmax_k A_k where
    ``max_k A_k >= decay ** (n - 1)`` (lit once: kept n steps; lit often: kept longer).
    ``n == 1`` returns ``raw`` unchanged.
    """
    if n == 1:
        return raw, MaskWindowState((), None)
    if mode == "union":
        recent = ((state.recent if state is not None else ()) + (raw,))[-n:]
        out = recent[0]
        for m in recent[1:]:
            out = torch.where(m > 0, m, out)
        return out, MaskWindowState(recent, None)
    if mode == "decay":
        onehot = torch.stack([(raw == k + 1) for k in range(n_classes)]).to(torch.float32)
        pres = onehot if state is None or state.presence is None else state.presence * decay + onehot
        best, cls = pres.max(dim=0)
        # 1e-6 slack: decay ** (n - 1) computed in float64 vs repeated float32 products
        keep = best >= (decay ** (n - 1)) * (1 - 1e-6)
        out = torch.where(keep, cls + 1, torch.zeros_like(cls)).to(torch.uint8)
        return out, MaskWindowState((), pres)
    raise ValueError(f"mask_window_mode {mode!r} is not allowed; use 'union' or 'decay'")


def window_steps(
    raws: Tensor, state: MaskWindowState | None, n: int, mode: Literal["union", "decay"], decay: float, n_classes: int
) -> tuple[Tensor, MaskWindowState]:
    """:func:`window_step` over T consecutive raw masks (T, H, W) at once; same results row by row.

    union: row t is the newest-wins combination of the last ``n`` raws up to t, computed
    with ``n - 1`` passes over the whole window (not T x n): the sequence (previous n - 1
    raws, then the T new ones) is combined at shifts 0..n-1.  decay is a recurrence and
    runs row by row.
    """
    if n == 1:
        return raws, MaskWindowState((), None)
    if mode == "union":
        prev = tuple(state.recent) if state is not None else ()
        t_n = raws.shape[0]
        # a fresh stream has fewer than n - 1 raws before it: empty masks stand in for them
        before = prev[-(n - 1) :]
        fill = [torch.zeros_like(raws[0])] * (n - 1 - len(before))
        seq = torch.stack([*fill, *before, *raws.unbind(0)])
        out = seq[0:t_n]
        for j in range(1, n):
            m = seq[j : j + t_n]
            out = torch.where(m > 0, m, out)
        # the state keeps the real raws only (a fresh stream's window starts short)
        recent = (prev + tuple(raws.unbind(0)))[-n:]
        return out, MaskWindowState(recent, None)
    outs = []
    for r in raws.unbind(0):
        o, state = window_step(r, state, n, mode, decay, n_classes)
        outs.append(o)
    assert state is not None
    return torch.stack(outs), state


@njit(cache=True)
def union_window_np(
    raw: np.ndarray, lit: np.ndarray, expire: np.ndarray, last: np.ndarray, t: int, n: int, out: np.ndarray,
) -> None:
    """The ``union`` window of :func:`window_step` for numpy masks (the event-driven path).

    Per pixel: ``last`` = step of its newest lighting; the window output is that lighting's
    class where ``t - last < n``, else 0 -- the same as "newest class among the
    last n raw masks".  ``out`` is the node's persistent window mask, updated in place with
    work proportional to the lit pixels, not H x W: the pixels lit ``n`` steps ago
    (``expire``, the ``lit`` of step ``t - n``) are cleared unless lit again since, then the
    pixels lit this step (``lit``: flat indices where ``raw != 0``) are written.  A full
    pass over ``last`` cost ~0.3 ms per step at 346x260.  Mutates ``last`` and ``out``.
    """
    for j in range(expire.shape[0]):
        o = expire[j]
        if last[o] == t - n:
            out[o] = 0
    for j in range(lit.shape[0]):
        o = lit[j]
        last[o] = t
        out[o] = raw[o]
