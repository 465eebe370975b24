"""Homeostasis for STDP training: adaptive per-map thresholds and dead-map recovery.

Thresholds are per output map (weights are shared across a map, so is the threshold) and
expressed as *multiples of the layer's base threshold* θ₀ (10.0 in both paper presets), so
the defaults hold for any θ₀.  Per sample ``n`` and map ``c`` with activity ``a[c] ∈ {0, 1}``
(the map won or fired in the sample)::

    θ[c] ← θ_rest + (θ[c] − θ_rest) · exp(−1 / τ_θ) + θ⁺ · a[c]       (decay, then raise)
    θ[c] ← min(θ[c], θ_max)

An over-active map thus climbs towards ``θ_max`` and others catch up; once it is quiet, its
threshold relaxes back to ``θ_rest`` with time constant ``τ_θ`` samples.

Dead-map recovery: a map silent for more than ``dead_after`` consecutive samples gets its
threshold lowered by ``dead_step`` per further silent sample, down to ``θ_min``, until it
fires again (then the normal decay brings it back to ``θ_rest``).  Without it a map whose
initial weights lose the race early never spikes and so never learns.

Defaults (multiples of θ₀; samples): ``theta_rest = 1.0``, ``theta_plus = 0.05``,
``tau_theta = 50``, ``theta_max = 2.0``, ``theta_min = 0.5``, ``dead_after = 20``,
``dead_step = 0.05``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class HomeostasisParams(NamedTuple):
    """Adaptive-threshold parameters (thresholds in multiples of the layer threshold, time in samples)."""

    theta_rest: float = 1.0
    theta_plus: float = 0.05
    tau_theta: float = 50.0
    theta_max: float = 2.0
    theta_min: float = 0.5
    dead_after: int = 20
    dead_step: float = 0.05


class HomeostasisState(NamedTuple):
    """``theta``: ``(C,)`` threshold multipliers; ``silent``: ``(C,)`` samples since each map was last active."""

    theta: torch.Tensor
    silent: torch.Tensor


def check_params(p: HomeostasisParams) -> None:
    """Raise ValueError naming the first parameter out of range."""
    if not (0.0 < p.theta_min <= p.theta_rest <= p.theta_max):
        raise ValueError(
            f"homeostasis thresholds min={p.theta_min} rest={p.theta_rest} max={p.theta_max} are inconsistent; "
            "need 0 < theta_min <= theta_rest <= theta_max"
        )
    if p.theta_plus < 0 or p.dead_step < 0:
        raise ValueError("homeostasis theta_plus and dead_step must be >= 0")
    if p.tau_theta <= 0:
        raise ValueError(f"homeostasis tau_theta={p.tau_theta} must be > 0 (samples)")
    if p.dead_after < 1:
        raise ValueError(f"homeostasis dead_after={p.dead_after} must be >= 1 (samples)")


def init_state(n_maps: int, params: HomeostasisParams, device: torch.device | str = "cpu") -> HomeostasisState:
    """Every map at ``θ_rest``, none silent."""
    return HomeostasisState(
        torch.full((n_maps,), float(params.theta_rest), device=device),
        torch.zeros(n_maps, dtype=torch.long, device=device),
    )


def update(state: HomeostasisState, active: torch.Tensor, params: HomeostasisParams) -> HomeostasisState:
    """One sample of homeostasis for maps with boolean ``active`` ``(C,)``; returns the new state."""
    decay = math.exp(-1.0 / params.tau_theta)
    act = active.to(state.theta.dtype)
    theta = params.theta_rest + (state.theta - params.theta_rest) * decay + params.theta_plus * act
    silent = torch.where(active, torch.zeros_like(state.silent), state.silent + 1)
    dead = silent > params.dead_after
    theta = torch.where(dead, theta - params.dead_step, theta)
    theta = theta.clamp(min=params.theta_min, max=params.theta_max)
    return HomeostasisState(theta, silent)
