"""Spike-timing-dependent plasticity (STDP) with soft bounds, as pure tensor functions.

The rule (Kheradpisheh et al. 2018, simplified STDP; used by SpikeSEG) depends only on the
*sign* of the timing difference between a presynaptic spike and the postsynaptic (winner's)
spike, and is multiplicatively soft-bounded so that weights stay in ``[0, 1]``::

    Δw =  a⁺ · w · (1 − w)    if t_pre ≤ t_post        (LTP: the input helped the spike)
    Δw = −a⁻ · w · (1 − w)    if t_pre > t_post         (LTD: it came late, or never)

A presynaptic neuron that never fired has ``t_pre = +inf`` and therefore gets LTD.

Because ``w·(1 − w)`` vanishes at 0 and 1 and ``a± ≤ 1``, one step maps ``[0, 1]`` into
``[0, 1]`` (``w + a w (1 − w) ≤ 1`` and ``w − a w (1 − w) ≥ 0``); we still clamp, so that
float rounding can never leave the interval.

The convergence metric of a layer is ``C_l = mean(w · (1 − w))``: 0 when every weight is
binary, 0.25 when every weight is 0.5.  A layer stops learning when ``C_l`` falls below a
threshold (0.01 by default, see :mod:`model.train`).

Spike times are float tensors of *time step indices* (``inf`` = did not fire in the
window); floats rather than ints because ``inf`` is the natural "never".
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

NEVER = float("inf")


class STDPParams(NamedTuple):
    """Learning rates of the soft-bounded STDP rule (``0 < a_minus, a_plus <= 1``)."""

    a_plus: float
    a_minus: float


#: Learning rates of the two papers SpikeSEG follows.
PRESETS: dict[str, STDPParams] = {
    "kheradpisheh2018": STDPParams(a_plus=0.004, a_minus=0.003),
    "igarss2023": STDPParams(a_plus=0.04, a_minus=0.03),
}


def check_params(params: STDPParams) -> None:
    """Raise ValueError unless both rates lie in (0, 1] (larger rates could leave [0, 1])."""
    for name, v in (("a_plus", params.a_plus), ("a_minus", params.a_minus)):
        if not (0.0 < v <= 1.0):
            raise ValueError(f"STDP {name}={v} is out of range; allowed 0 < {name} <= 1")


def stdp_delta(w: torch.Tensor, pre_before_post: torch.Tensor, params: STDPParams) -> torch.Tensor:
    """Weight change for weights ``w`` given where the presynaptic spike was not later than the post.

    ``Δw = where(pre_before_post, a⁺, −a⁻) · w · (1 − w)``; shapes broadcast.
    """
    rate = torch.where(
        pre_before_post,
        torch.as_tensor(params.a_plus, dtype=w.dtype, device=w.device),
        torch.as_tensor(-params.a_minus, dtype=w.dtype, device=w.device),
    )
    return rate * w * (1.0 - w)


def stdp_update(w: torch.Tensor, t_pre: torch.Tensor, t_post: torch.Tensor | float, params: STDPParams) -> torch.Tensor:
    """New weights ``clamp(w + Δw, 0, 1)`` for presynaptic times ``t_pre`` and post time ``t_post``.

    ``t_pre`` broadcasts against ``w`` (``inf`` = never fired -> LTD).  ``w`` is not modified.
    """
    return (w + stdp_delta(w, t_pre <= t_post, params)).clamp_(0.0, 1.0)


def receptive_fields(
    pre_times: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    fill: float = NEVER,
) -> torch.Tensor:
    """Presynaptic spike times seen by the output neurons at ``(ys, xs)`` of a conv layer.

    ``pre_times`` is ``(C_in, H, W)``; the layer is a stride-1 convolution with ``kernel``
    ``(kh, kw)`` and zero ``padding`` ``(ph, pw)``, so output ``(y, x)`` sees input rows
    ``y − ph .. y − ph + kh − 1``.  Positions in the padding read ``fill`` (default ``inf``:
    never fired; online adaptation gathers input *spikes* with ``fill=0``).
    Returns ``(K, C_in, kh, kw)`` for ``K = len(ys)`` winners.
    """
    kh, kw = kernel
    ph, pw = padding
    padded = F.pad(pre_times, (pw, pw, ph, ph), value=fill)
    # unfold the K windows with advanced indexing: rows (K, kh, 1), cols (K, 1, kw)
    rows = ys.view(-1, 1, 1) + torch.arange(kh, device=pre_times.device).view(1, kh, 1)
    cols = xs.view(-1, 1, 1) + torch.arange(kw, device=pre_times.device).view(1, 1, kw)
    return padded[:, rows, cols].permute(1, 0, 2, 3)


def update_winners(
    weight: torch.Tensor,
    pre_times: torch.Tensor,
    winners: torch.Tensor,
    t_post: torch.Tensor,
    params: STDPParams,
    padding: tuple[int, int],
) -> torch.Tensor:
    """Apply STDP to the maps of the winners; returns the new weight tensor (input untouched).

    ``weight`` is ``(C_out, C_in, kh, kw)``; ``pre_times`` ``(C_in, H, W)``; ``winners``
    ``(K, 3)`` long rows ``(c, y, x)``; ``t_post`` ``(K,)`` the winners' spike times.
    Each winner updates its map's shared kernel from its own receptive field.  Two winners
    of one map (possible in ``local`` WTA mode) add their updates, all computed from the
    same old weights (alternative: apply them one after another; the difference is second
    order in the rates and the batched form avoids a Python loop).
    """
    if winners.numel() == 0:
        return weight.clone()
    kh, kw = weight.shape[-2:]
    rf = receptive_fields(pre_times, winners[:, 1], winners[:, 2], (kh, kw), padding)
    w_old = weight[winners[:, 0]]
    delta = stdp_delta(w_old, rf <= t_post.view(-1, 1, 1, 1), params)
    return weight.index_add(0, winners[:, 0], delta).clamp_(0.0, 1.0)


def convergence(w: torch.Tensor) -> torch.Tensor:
    """``C_l = mean(w · (1 − w))`` over all weights (0-d tensor)."""
    return (w * (1.0 - w)).mean()


def map_convergence(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-map ``C`` of a ``(C_out, ...)`` weight tensor: ``(C_out,)``."""
    return (weight * (1.0 - weight)).flatten(1).mean(1)


def converged_ratio(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of output maps whose own ``C`` is below ``threshold`` (0-d tensor)."""
    return (map_convergence(weight) < threshold).float().mean()
