"""Spiking neuron maths as pure functions: ``step(i, state, params) -> (spikes, state)``.

Three membrane updates (norse style: typed parameter/state tuples, ``state=None`` means
"start fresh", nothing hidden in modules):

* IF (Conv3)::

      V <- V + I

* LIF, subtractive leak (IGARSS 2023, Kirkland et al.; constant leak lambda, floor at 0)::

      V <- max(V + I - lambda, 0)

* LIF, multiplicative leak (Kheradpisheh et al. 2018; decay factor beta)::

      V <- beta * V + I

then, for all three, with a per-channel threshold theta (a (C, 1, 1) tensor broadcast over
H, W)::

      S     = (V >= theta)                 # float 0/1
      S     = S and not fired              # fire-once mode only
      fired = fired or S                   # fire-once mode only
      V     = V * (1 - S)                  # reset to 0

Fire-once (Kheradpisheh 2018: at most one spike per neuron per sample) keeps a boolean
``fired`` mask in the state; without it ``fired`` is ``None`` and costs nothing.

Decision: one function per update plus a dispatcher :func:`neuron_step`, rather than one
function with mode flags inside the arithmetic, so each docstring carries exactly its
equation and the golden tests pin each one.  Spikes are float 0/1 (they feed convolutions).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

LeakMode = Literal["subtractive", "multiplicative", "none"]


class NeuronParams(NamedTuple):
    """Parameters of one layer of neurons.

    ``theta``: threshold, a tensor broadcastable to the membrane (per channel: (C, 1, 1)).
    ``leak``: ``"subtractive"`` (uses ``lam``), ``"multiplicative"`` (uses ``beta``) or
    ``"none"`` (IF).  ``fire_once``: a neuron that fired since the last reset never fires again.
    """

    theta: Tensor
    leak: LeakMode = "none"
    lam: float = 0.0
    beta: float = 1.0
    fire_once: bool = False


class NeuronState(NamedTuple):
    """Membrane potential ``v`` and (fire-once only) the boolean ``fired`` mask; same shape."""

    v: Tensor
    fired: Tensor | None = None


def fresh_state(like: Tensor, fire_once: bool) -> NeuronState:
    """Zero membrane shaped like ``like``; a ``fired`` mask only in fire-once mode."""
    return NeuronState(
        v=torch.zeros_like(like),
        fired=torch.zeros_like(like, dtype=torch.bool) if fire_once else None,
    )


def _spike_reset(v: Tensor, state_fired: Tensor | None, params: NeuronParams) -> tuple[Tensor, NeuronState]:
    """``S = (V >= theta) [and not fired]``, ``fired |= S``, ``V = V * (1 - S)``."""
    hit = v >= params.theta
    fired = state_fired
    if params.fire_once:
        # fired is None only when a caller passes a non-fire-once state; treat it as "none fired".
        if fired is None:
            fired = torch.zeros_like(hit)
        hit = hit & ~fired
        fired = fired | hit
    s = hit.to(v.dtype)
    # masked_fill instead of V * (1 - S): same values (V is finite), one pass, and it keeps -0.0 out.
    v = v.masked_fill(hit, 0.0)
    return s, NeuronState(v=v, fired=fired)


def if_step(i: Tensor, state: NeuronState | None, params: NeuronParams) -> tuple[Tensor, NeuronState]:
    """Integrate-and-fire: ``V <- V + I``; ``S = V >= theta``; reset ``V <- 0`` where ``S``."""
    if state is None:
        state = fresh_state(i, params.fire_once)
    return _spike_reset(state.v + i, state.fired, params)


def lif_subtractive_step(
    i: Tensor, state: NeuronState | None, params: NeuronParams
) -> tuple[Tensor, NeuronState]:
    """Subtractive LIF (IGARSS 2023): ``V <- max(V + I - lambda, 0)``; spike at ``V >= theta``; reset to 0.

    The floor at 0 makes the leak composable: ``max(max(v - a, 0) - b, 0) = max(v - a - b, 0)``
    (the sparse path relies on it to apply the leak lazily).
    """
    if state is None:
        state = fresh_state(i, params.fire_once)
    v = (state.v + i - params.lam).clamp_min_(0.0)
    return _spike_reset(v, state.fired, params)


def lif_multiplicative_step(
    i: Tensor, state: NeuronState | None, params: NeuronParams
) -> tuple[Tensor, NeuronState]:
    """Multiplicative LIF (Kheradpisheh 2018): ``V <- beta * V + I``; spike at ``V >= theta``; reset to 0.

    No floor: with signed Conv1 kernels V may go negative, as in the paper's model.
    """
    if state is None:
        state = fresh_state(i, params.fire_once)
    v = torch.add(i, state.v, alpha=params.beta)
    return _spike_reset(v, state.fired, params)


def neuron_step(i: Tensor, state: NeuronState | None, params: NeuronParams) -> tuple[Tensor, NeuronState]:
    """Dispatch on ``params.leak`` to :func:`lif_subtractive_step`, :func:`lif_multiplicative_step`, :func:`if_step`."""
    if params.leak == "subtractive":
        return lif_subtractive_step(i, state, params)
    if params.leak == "multiplicative":
        return lif_multiplicative_step(i, state, params)
    if params.leak == "none":
        return if_step(i, state, params)
    raise ValueError(f"leak {params.leak!r} is not allowed; use 'subtractive', 'multiplicative' or 'none'")
