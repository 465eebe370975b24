"""SpikeSEG encoder: Conv1 (fixed) -> LIF -> Pool1 -> Conv2 -> LIF -> Pool2 -> Conv3 -> IF.

Per step, for input x of shape (B, C_in, H, W) (time is a loop over steps; B are
independent streams)::

    I1 = conv2d(x, W1[4, C_in, 5, 5], padding=2)          S1, V1 = LIF(I1; lambda1, theta1)
    P1, idx1 = max_pool2d(S1, 2, stride=2)                  (floor mode; input size kept)
    I2 = conv2d(P1, W2[36, 4, 5, 5], padding=2)            S2, V2 = LIF(I2; lambda2, theta2)
    P2, idx2 = max_pool2d(S2, 2, stride=2)
    I3 = conv2d(P2, W3[n_classes, 36, 7, 7], padding=3)    S3, V3 = IF(I3; theta3)

The module is thin: it owns W1 (buffer, fixed), W2 and W3 (Parameters, requires_grad
False, so the learning code may update them in place) and the per-channel thresholds.
All state (membranes, fire-once masks, first-spike times, step counter) travels in
:class:`EncoderState`, which :meth:`Encoder.step` takes and returns; nothing is cached on
the module.  Pooling indices travel in :class:`EncoderOutput`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, Threshold
from .conv1 import conv1_weights
from .neurons import NeuronParams, NeuronState, fresh_state, neuron_step

N_CONV2 = 36
LAYERS = ("conv1", "conv2", "conv3")
#: Weights live on a grid of ``2 ** -WEIGHT_GRID_BITS`` (see :func:`quantize_weights`).
WEIGHT_GRID_BITS = 12


def quantize_weights(w: Tensor, clip: bool = True) -> Tensor:
    """``round(w * 4096) / 4096``, clipped to [0, 1] for learned layers (``clip``); a new tensor.

    Why (the exactness contract between the dense, sparse and CUDA paths): float32
    convolution is not correctly rounded, and every backend (MKL-DNN, cuDNN, our scatter
    kernels) sums in another order, so two paths can disagree in the last bit of a current
    and flip a spike at ``V == theta``.  With every weight a multiple of 2^-12, a product with
    a binary or small-count input is a multiple of 2^-12, and every partial sum below 2^11
    in magnitude is exactly representable in float32 (24-bit significand): the sum is exact
    whatever the order, so all paths give bit-identical currents, membranes and spikes.
    Conv3 is the tightest case: 36 x 49 = 1,764 binary inputs x weights <= 1 < 2^11.
    The decoder multiplies weights by weights (a 2^-24 grid, then 2^-36 with W1) and its
    sums reach ~10^4, which float32 cannot hold exactly, so decoders sum in float64
    (exact up to 2^17 at the 2^-36 grid: far above what one step produces); the mask's
    ``saliency > threshold`` is then decided on exact values, also where the signed
    zero-mean W1 cancels to exactly 0 (no epsilon band needed).
    The grid costs nothing in accuracy: STDP steps (a+ = 0.004) are 16 grid units, and the
    N(0.8, 0.01) initialisation keeps ~41 distinct values per std.
    Alternative not taken: float64 everywhere (2x the memory traffic of the dense path,
    and TF32/cuDNN would still need pinning).
    """
    q = torch.round(w * float(1 << WEIGHT_GRID_BITS)) / float(1 << WEIGHT_GRID_BITS)
    return q.clamp_(0.0, 1.0) if clip else q


class EncoderState(NamedTuple):
    """Everything the encoder remembers between steps (``None`` = fresh).

    ``neurons``: (conv1, conv2, conv3) membranes and fire-once masks.
    ``first_spike``: per layer, int32 step index (since reset) of each neuron's first spike, -1 if
    none; ``None`` when the steps ran with ``first_spikes=False`` (the streaming node: nothing
    reads them there, and three full-size int32 maps per step were its largest dense stage).
    ``t``: steps since reset (a host int: no device sync needed to read it).
    """

    neurons: tuple[NeuronState, NeuronState, NeuronState]
    first_spike: tuple[Tensor, Tensor, Tensor] | None
    t: int


class EncoderOutput(NamedTuple):
    """One step's encoder output (seed 000's fields).

    ``classification_spikes``: S3, (B, n_classes, H/4, W/4), float 0/1.
    ``pooling_indices``: (idx1, idx2) from max_pool2d(return_indices=True).
    ``pooling_output_sizes``: (H1, W1), (H2, W2): the pooling *input* sizes, passed to
    max_unpool2d as ``output_size`` so odd sizes round-trip.
    ``layer_spikes``: {"conv1": S1, "pool1": P1, "conv2": S2, "pool2": P2, "conv3": S3}.
    ``first_spike_times``: {"conv1", "conv2", "conv3"} -> int32 tensors (-1 = not yet).
    ``has_spikes``: 0-dim bool tensor (no host sync); ``n_classification_spikes``: 0-dim tensor.
    """

    classification_spikes: Tensor
    pooling_indices: tuple[Tensor, Tensor]
    pooling_output_sizes: tuple[tuple[int, int], tuple[int, int]]
    layer_spikes: dict[str, Tensor]
    first_spike_times: dict[str, Tensor]
    has_spikes: Tensor
    n_classification_spikes: Tensor


def _theta_tensor(value: Threshold, n: int) -> Tensor:
    vals = list(value) if isinstance(value, tuple) else [float(value)]
    if len(vals) == 1:
        vals = vals * n
    return torch.tensor(vals, dtype=torch.float32).view(n, 1, 1)


def init_learned_weights(n_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Paper initialisation: W2 (36, 4, 5, 5), W3 (n_classes, 36, 7, 7) ~ N(0.8, 0.01) clipped to [0, 1].

    0.01 is the standard deviation (seed 000 writes N(0.8, 0.01)); a seeded CPU generator
    makes it identical on every machine.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    w2 = torch.normal(0.8, 0.01, (N_CONV2, 4, 5, 5), generator=g).clamp_(0.0, 1.0)
    w3 = torch.normal(0.8, 0.01, (n_classes, N_CONV2, 7, 7), generator=g).clamp_(0.0, 1.0)
    return w2, w3


def _first_spike(first: Tensor, s: Tensor, t: int) -> Tensor:
    """``first[s & first < 0] = t`` without mutating ``first``."""
    return torch.where((first < 0) & (s > 0), torch.full_like(first, t), first)


class Encoder(nn.Module):
    """Thin module owning W1, W2, W3 and thresholds; the maths is in :func:`encoder_step`."""

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        if in_channels not in (1, 2):
            raise ValueError(f"in_channels={in_channels} is not allowed; use 1 (merged) or 2 (OFF, ON)")
        self.cfg = cfg
        self.in_channels = in_channels
        self.n_classes = cfg.n_classes
        # every weight on the 2^-12 grid from the start (quantize_weights: the exactness contract)
        self.register_buffer("w1", quantize_weights(conv1_weights(cfg.conv1, in_channels, cfg.conv1_gain), clip=False))
        w2, w3 = init_learned_weights(cfg.n_classes, cfg.seed)
        self.w2 = nn.Parameter(quantize_weights(w2), requires_grad=False)
        self.w3 = nn.Parameter(quantize_weights(w3), requires_grad=False)
        self.register_buffer("theta1", _theta_tensor(cfg.theta1, 4))
        self.register_buffer("theta2", _theta_tensor(cfg.theta2, N_CONV2))
        self.register_buffer("theta3", _theta_tensor(cfg.theta3, cfg.n_classes))

    @torch.no_grad()
    def quantize_(self) -> None:
        """Put W2 and W3 back on the 2^-12 grid in place (call after every weight update; W1 is fixed)."""
        self.w2.copy_(quantize_weights(self.w2))
        self.w3.copy_(quantize_weights(self.w3))

    def params(self) -> tuple[NeuronParams, NeuronParams, NeuronParams]:
        """Neuron parameters of the three layers from the config and the threshold tensors."""
        c = self.cfg
        if c.leak == "subtractive":
            p1 = NeuronParams(self.theta1, "subtractive", lam=c.lambda1, fire_once=c.fire_once)
            p2 = NeuronParams(self.theta2, "subtractive", lam=c.lambda2, fire_once=c.fire_once)
        else:
            p1 = NeuronParams(self.theta1, "multiplicative", beta=c.beta1, fire_once=c.fire_once)
            p2 = NeuronParams(self.theta2, "multiplicative", beta=c.beta2, fire_once=c.fire_once)
        p3 = NeuronParams(self.theta3, "none", fire_once=c.fire_once)
        return p1, p2, p3

    def prepare_input(self, frame: Tensor) -> Tensor:
        """(C, H, W) or (B, C, H, W) event counts -> float32 (B, C, H, W) input per ``input_mode``."""
        x = frame if frame.dim() == 4 else frame.unsqueeze(0)
        if self.cfg.input_mode == "binary":
            return (x > 0).to(torch.float32)
        return x.to(torch.float32)

    def step(self, x: Tensor, state: EncoderState | None, first_spikes: bool = True) -> tuple[EncoderOutput, EncoderState]:
        """One time step; see :func:`encoder_step`."""
        return encoder_step(x, state, self.w1, self.w2, self.w3, self.params(), first_spikes)

    def window(self, x: Tensor, state: EncoderState | None, scan: Any = None) -> tuple[EncoderOutput, EncoderState]:
        """``T`` consecutive steps of one stream at once; see :func:`encoder_window`."""
        return encoder_window(x, state, self.w1, self.w2, self.w3, self.params(), scan or scan_steps)


def fresh_encoder_state(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, params: tuple[NeuronParams, NeuronParams, NeuronParams],
    first_spikes: bool = True,
) -> EncoderState:
    """All-zero state for input shaped like ``x`` (B, C_in, H, W) (no first-spike maps if not ``first_spikes``)."""
    b, _, h, w = x.shape
    shapes = [(b, w1.shape[0], h, w), (b, w2.shape[0], h // 2, w // 2), (b, w3.shape[0], h // 4, w // 4)]
    neurons = []
    firsts = []
    for shp, p in zip(shapes, params):
        z = torch.zeros(shp, dtype=torch.float32, device=x.device)
        neurons.append(fresh_state(z, p.fire_once))
        firsts.append(torch.full(shp, -1, dtype=torch.int32, device=x.device))
    return EncoderState(tuple(neurons), tuple(firsts) if first_spikes else None, 0)  # type: ignore[arg-type]


def encoder_step(
    x: Tensor,
    state: EncoderState | None,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    params: tuple[NeuronParams, NeuronParams, NeuronParams],
    first_spikes: bool = True,
) -> tuple[EncoderOutput, EncoderState]:
    """The encoder equations (module docstring) for one step; pure: inputs are not mutated.

    ``x``: (B, C_in, H, W) float32 with H, W >= 4.  Returns the step's output and the new state.
    ``first_spikes=False`` skips the first-spike maps (``first_spike_times`` is then ``{}``
    and the state's ``first_spike`` ``None``); a state carries them or not for its lifetime.
    """
    if x.dim() != 4 or x.shape[-1] < 4 or x.shape[-2] < 4:
        raise ValueError(f"encoder input must be (B, C, H, W) with H, W >= 4, got {tuple(x.shape)}")
    if state is None:
        state = fresh_encoder_state(x, w1, w2, w3, params, first_spikes)
    p1, p2, p3 = params
    t = state.t
    n1, n2, n3 = state.neurons

    s1, n1 = neuron_step(F.conv2d(x, w1, padding=2), n1, p1)
    size1 = (s1.shape[-2], s1.shape[-1])
    pool1, idx1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
    s2, n2 = neuron_step(F.conv2d(pool1, w2, padding=2), n2, p2)
    size2 = (s2.shape[-2], s2.shape[-1])
    pool2, idx2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
    s3, n3 = neuron_step(F.conv2d(pool2, w3, padding=3), n3, p3)

    firsts = None
    times: dict[str, Tensor] = {}
    if state.first_spike is not None:
        f1, f2, f3 = state.first_spike
        firsts = (_first_spike(f1, s1, t), _first_spike(f2, s2, t), _first_spike(f3, s3, t))
        times = dict(zip(LAYERS, firsts))
    n_cls = s3.sum()
    out = EncoderOutput(
        classification_spikes=s3,
        pooling_indices=(idx1, idx2),
        pooling_output_sizes=(size1, size2),
        layer_spikes={"conv1": s1, "pool1": pool1, "conv2": s2, "pool2": pool2, "conv3": s3},
        first_spike_times=times,
        has_spikes=n_cls > 0,
        n_classification_spikes=n_cls,
    )
    return out, EncoderState((n1, n2, n3), firsts, t + 1)  # type: ignore[arg-type]


def scan_steps(i: Tensor, state: NeuronState | None, p: NeuronParams) -> tuple[Tensor, NeuronState]:
    """Neuron updates over the T rows of ``i`` (T, C, H, W), in order; rows are consecutive steps."""
    spikes = []
    for t in range(i.shape[0]):
        s, state = neuron_step(i[t : t + 1], state, p)
        spikes.append(s)
    assert state is not None  # T >= 1 (checked by encoder_window)
    return torch.cat(spikes), state


def encoder_window(
    x: Tensor,
    state: EncoderState | None,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    params: tuple[NeuronParams, NeuronParams, NeuronParams],
    scan: Callable[[Tensor, NeuronState | None, NeuronParams], tuple[Tensor, NeuronState]] = scan_steps,
) -> tuple[EncoderOutput, EncoderState]:
    """``T`` consecutive steps of ONE stream, layer by layer: ``x`` is (T, C_in, H, W), row t = step t.

    Each convolution and pooling runs once over all T steps (a batch of T); only the neuron
    updates run in order over t, because V_t depends on V_(t-1).  That is exactly the
    per-step recurrence, so the outputs (row t of every tensor in the returned
    :class:`EncoderOutput`) equal T calls of :func:`encoder_step`: bit for bit, because with
    weights on the 2^-12 grid every conv sum is exact whatever the batch size or kernel
    (``quantize_weights``).  Why: on CUDA a step is ~40 tiny launches; batching T steps
    per conv cuts launches and host syncs by T (PERF-NOTES: it does not pay on a 2-core CPU,
    where the node keeps the per-step loop).  No first-spike maps (streaming use); the
    state's ``t`` advances by T.  ``has_spikes``/``n_classification_spikes`` are per row (T,).
    ``scan``: the neuron recurrence over the T rows (:func:`scan_steps`, or the fused
    :class:`model.fused.CompiledScan` on CUDA: one kernel per layer instead of ~7 per step).
    """
    if x.dim() != 4 or x.shape[0] < 1 or x.shape[-1] < 4 or x.shape[-2] < 4:
        raise ValueError(f"encoder window input must be (T, C, H, W) with T >= 1, H, W >= 4, got {tuple(x.shape)}")
    if state is None:
        state = fresh_encoder_state(x[:1], w1, w2, w3, params, first_spikes=False)
    if state.first_spike is not None:
        raise ValueError("encoder_window does not track first-spike maps; start from a state made with first_spikes=False")
    p1, p2, p3 = params
    n1, n2, n3 = state.neurons
    s1, n1 = scan(F.conv2d(x, w1, padding=2), n1, p1)
    pool1, idx1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
    s2, n2 = scan(F.conv2d(pool1, w2, padding=2), n2, p2)
    pool2, idx2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
    s3, n3 = scan(F.conv2d(pool2, w3, padding=3), n3, p3)
    n_cls = s3.flatten(1).sum(1)
    out = EncoderOutput(
        classification_spikes=s3,
        pooling_indices=(idx1, idx2),
        pooling_output_sizes=((s1.shape[-2], s1.shape[-1]), (s2.shape[-2], s2.shape[-1])),
        layer_spikes={"conv1": s1, "pool1": pool1, "conv2": s2, "pool2": pool2, "conv3": s3},
        first_spike_times={},
        has_spikes=n_cls > 0,
        n_classification_spikes=n_cls,
    )
    return out, EncoderState((n1, n2, n3), None, state.t + x.shape[0])
