"""Adaptive thresholds rise for an over-active map and relax back; dead maps recover."""
from __future__ import annotations

import math

import pytest
import torch

from model.learning.homeostasis import HomeostasisParams, check_params, init_state, update


def test_over_active_map_rises_then_relaxes() -> None:
    p = HomeostasisParams()
    s = init_state(2, p)
    on = torch.tensor([True, False])
    for _ in range(15):  # fewer than dead_after, so the silent map 1 stays at rest
        s = update(s, on, p)
    hi = s.theta[0].item()
    assert hi > 1.5 and hi <= p.theta_max
    assert s.theta[1].item() == pytest.approx(p.theta_rest)
    # first step hand-computed: 1 + 0 * decay + 0.05
    s1 = update(init_state(1, p), torch.tensor([True]), p)
    assert s1.theta.item() == pytest.approx(1.05)
    # quiet: relaxes towards rest with time constant tau (for fewer than dead_after samples)
    off = torch.tensor([False, True])
    for _ in range(10):
        s = update(s, off, p)
    expected = 1.0 + (hi - 1.0) * math.exp(-10 / p.tau_theta)
    assert s.theta[0].item() == pytest.approx(expected, rel=1e-5)
    assert s.theta[0].item() < hi


def test_theta_max_caps() -> None:
    p = HomeostasisParams(theta_plus=0.5)
    s = init_state(1, p)
    for _ in range(50):
        s = update(s, torch.tensor([True]), p)
    assert s.theta.item() == pytest.approx(p.theta_max)


def test_dead_map_recovers_by_lowering_threshold() -> None:
    p = HomeostasisParams(dead_after=3)
    s = init_state(1, p)
    for _ in range(3):
        s = update(s, torch.tensor([False]), p)
    assert s.theta.item() == pytest.approx(1.0) and s.silent.item() == 3
    thetas = []
    for _ in range(40):
        s = update(s, torch.tensor([False]), p)
        thetas.append(s.theta.item())
    assert thetas[0] < 1.0 and thetas[-1] == pytest.approx(p.theta_min)
    s = update(s, torch.tensor([True]), p)  # it fires: counter resets, threshold goes back up
    assert s.silent.item() == 0 and s.theta.item() > p.theta_min


def test_bad_params_rejected() -> None:
    with pytest.raises(ValueError, match="theta_min"):
        check_params(HomeostasisParams(theta_min=1.5))
    with pytest.raises(ValueError, match="tau_theta"):
        check_params(HomeostasisParams(tau_theta=0))
