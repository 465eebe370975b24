"""Compiled neuron scans for the dense window path (CUDA): T steps of one layer in one kernel.

The window path (:func:`model.encoder.encoder_window`) runs each convolution once for T
steps, but the neuron recurrence ``V_t = f(V_(t-1), I_t)`` stays a loop over t: in eager
torch that is ~7 launches per layer per step (add, sub, clamp, compare, cast, masked_fill,
slice), ~21 per step for the three layers, which is what a GPU step then costs (each launch
~5-10 us of host time against ~1-3 us of GPU work at 640x480).  Here the loop over a chunk
of :data:`CHUNK` steps is traced by ``torch.compile``: every op is pointwise, so inductor
fuses the whole chunk into one kernel per layer that reads each neuron's T currents and
writes its T spikes, keeping V in a register.

Exactness: only the subtractive LIF and IF updates are compiled.  Their ops are adds,
subtractions, a max with 0 and comparisons, in the eager order ``(V + I) - lambda``; each is
one correctly rounded IEEE operation in any backend, so the fused kernel gives the eager
spikes and membranes bit for bit.  The multiplicative leak ``I + beta V`` is left eager: a
compiler may contract it into an FMA, which rounds once instead of twice.  The node checks
the compiled scan against the eager one at open (:func:`verify`), on its own device.

Shapes: a chunk always has :data:`CHUNK` rows, so each layer compiles once per resolution;
a shorter window is padded with rows marked invalid, which leave the state untouched and
emit no spike (the valid flags are a tensor input, not a constant: no recompilation).
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import Tensor

from .neurons import NeuronParams, NeuronState, fresh_state

#: Rows per compiled chunk: the engine's micro-batches are at most 16 steps (engine.max_batch).
CHUNK = 16

Scan = Callable[[Tensor, "NeuronState | None", NeuronParams], "tuple[Tensor, NeuronState]"]


def compilable(p: NeuronParams) -> bool:
    """True for the updates whose compiled form is exact (subtractive LIF, IF)."""
    return p.leak in ("subtractive", "none")


def scan_chunk(
    i: Tensor, v: Tensor, fired: Tensor, valid: Tensor, theta: Tensor, lam: float, leak: str, fire_once: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The neuron updates of :mod:`model.neurons` over the rows of ``i`` (L, C, H, W), in order.

    ``v`` (1, C, H, W) membrane, ``fired`` (1, C, H, W) bool (fire-once; all False otherwise),
    ``valid`` (L,) bool: an invalid row changes nothing and spikes nowhere.  Returns the
    spikes (L, C, H, W) as bool, the new ``v`` and ``fired``.  Same equations and operation
    order as :func:`model.neurons.lif_subtractive_step` / :func:`model.neurons.if_step`.
    """
    outs = []
    for t in range(i.shape[0]):
        if leak == "subtractive":
            nv = (v + i[t : t + 1] - lam).clamp_min(0.0)
        else:
            nv = v + i[t : t + 1]
        ok = valid[t]
        hit = (nv >= theta) & ok
        if fire_once:
            hit = hit & ~fired
            fired = fired | hit
        v = torch.where(ok, nv.masked_fill(hit, 0.0), v)
        outs.append(hit)
    return torch.cat(outs), v, fired


class CompiledScan:
    """A drop-in for the eager scan of :func:`model.encoder.encoder_window`, compiled per chunk.

    ``scan(i, state, params) -> (spikes (T, C, H, W) float, NeuronState)``; layers whose
    update is not :func:`compilable` run ``eager``.
    """

    def __init__(self, eager: Scan) -> None:
        self.eager = eager
        # its own copy of the code: dynamo keeps compiled variants per code object and runs
        # eager past ``recompile_limit`` (8); a node needs 3 per resolution, and every node of
        # a process (and every test) would otherwise share one budget
        own = types.FunctionType(scan_chunk.__code__.replace(), scan_chunk.__globals__, "scan_chunk")
        self._fn: Any = torch.compile(own, fullgraph=True, dynamic=False)

    def __call__(self, i: Tensor, state: NeuronState | None, p: NeuronParams) -> tuple[Tensor, NeuronState]:
        if not compilable(p):
            return self.eager(i, state, p)
        if state is None:
            state = fresh_state(i[:1], p.fire_once)
        v = state.v
        fired = state.fired if state.fired is not None else torch.zeros_like(v, dtype=torch.bool)
        lam = float(p.lam) if p.leak == "subtractive" else 0.0
        t_n = i.shape[0]
        spikes = []
        for a in range(0, t_n, CHUNK):
            part = i[a : a + CHUNK]
            n = part.shape[0]
            valid = torch.arange(CHUNK, device=i.device) < n
            if n < CHUNK:  # pad: the invalid rows leave the state as it is
                part = torch.cat([part, part.new_zeros((CHUNK - n, *part.shape[1:]))])
            s, v, fired = self._fn(part, v, fired, valid, p.theta, lam, p.leak, p.fire_once)
            spikes.append(s[:n])
        out = torch.cat(spikes) if len(spikes) > 1 else spikes[0]
        return out.to(i.dtype), NeuronState(v=v, fired=fired if p.fire_once else None)


def verify(scan: CompiledScan, shapes: list[tuple[int, int, int]], params: tuple[NeuronParams, ...],
           device: torch.device, steps: int = CHUNK + 3, seed: int = 0) -> None:
    """Raise ``AssertionError`` unless ``scan`` equals its eager scan bit for bit on random currents.

    ``shapes``: (C, H, W) per layer, as the node will run them (so the compiled kernels are
    the ones the stream uses: compiled here, reused after).  ``steps`` > CHUNK covers a full
    chunk, a padded one and the state carried between them.  Currents are on the 2^-12 grid,
    as the convolutions produce them, with a spread that makes neurons spike and reset.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    for (c, h, w), p in zip(shapes, params):
        if not compilable(p):
            continue
        th = float(p.theta.max())
        cur = torch.round(torch.rand((steps, c, h, w), generator=g) * (0.8 * th * 4096)) / 4096
        cur = cur.to(device)
        s_e, n_e = scan.eager(cur, None, p)
        s_c, n_c = scan(cur, None, p)
        if not (torch.equal(s_e, s_c) and torch.equal(n_e.v, n_c.v)):
            diff = int((s_e != s_c).sum())
            raise AssertionError(f"compiled neuron scan differs from eager on a ({c}, {h}, {w}) layer: {diff} spikes")
