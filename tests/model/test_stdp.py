"""Golden, hand-computed STDP updates; soft bounds; the convergence metric."""
from __future__ import annotations

import math

import pytest
import torch

from model.learning.stdp import (
    NEVER,
    PRESETS,
    STDPParams,
    check_params,
    convergence,
    converged_ratio,
    map_convergence,
    receptive_fields,
    stdp_update,
    update_winners,
)

P = STDPParams(a_plus=0.04, a_minus=0.03)


def test_presets_are_the_papers_rates() -> None:
    assert PRESETS["kheradpisheh2018"] == STDPParams(0.004, 0.003)
    assert PRESETS["igarss2023"] == STDPParams(0.04, 0.03)


def test_ltp_hand_computed() -> None:
    # w = 0.8, pre at 2 <= post at 3: Δw = 0.04 * 0.8 * 0.2 = 0.0064
    w = torch.tensor([0.8])
    out = stdp_update(w, torch.tensor([2.0]), 3.0, P)
    assert out.item() == pytest.approx(0.8064, abs=1e-7)
    # same step counts as LTP (t_pre <= t_post)
    assert stdp_update(w, torch.tensor([3.0]), 3.0, P).item() == pytest.approx(0.8064, abs=1e-7)


def test_ltd_hand_computed() -> None:
    # w = 0.8, pre at 5 > post at 3: Δw = -0.03 * 0.8 * 0.2 = -0.0048
    out = stdp_update(torch.tensor([0.8]), torch.tensor([5.0]), 3.0, P)
    assert out.item() == pytest.approx(0.7952, abs=1e-7)


def test_never_fired_pre_gets_ltd() -> None:
    out = stdp_update(torch.tensor([0.5, 0.5]), torch.tensor([NEVER, 0.0]), 0.0, P)
    assert out.tolist() == pytest.approx([0.5 - 0.03 * 0.25, 0.5 + 0.04 * 0.25], abs=1e-7)


def test_only_sign_of_timing_matters() -> None:
    w = torch.full((3,), 0.3)
    a = stdp_update(w, torch.tensor([0.0, 9.0, 10.0]), 10.0, P)
    assert a[0] == a[1] == a[2]
    b = stdp_update(w, torch.tensor([11.0, 50.0, NEVER]), 10.0, P)
    assert b[0] == b[1] == b[2] and b[0] < 0.3


def test_input_not_mutated_and_soft_bounds_keep_weights_in_unit_interval() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1000, generator=g)
    w[:3] = torch.tensor([0.0, 1.0, 0.5])
    w0 = w.clone()
    strong = STDPParams(1.0, 1.0)
    for i in range(200):
        t_pre = torch.randint(0, 3, (1000,), generator=g).float()
        w = stdp_update(w, t_pre, 1.0, strong)
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    # binary weights are fixed points of the rule
    assert w[0].item() == 0.0 and w[1].item() == 1.0
    new = stdp_update(w0, torch.zeros(1000), 1.0, P)
    assert not torch.equal(new, w0) and torch.equal(w0[:3], torch.tensor([0.0, 1.0, 0.5]))


def test_convergence_metric() -> None:
    assert convergence(torch.tensor([0.0, 1.0, 1.0, 0.0])).item() == 0.0
    assert convergence(torch.full((5, 5), 0.5)).item() == pytest.approx(0.25)
    w = torch.stack([torch.zeros(2, 3, 3), torch.full((2, 3, 3), 0.5)])
    assert map_convergence(w).tolist() == pytest.approx([0.0, 0.25])
    assert converged_ratio(w, 0.01).item() == pytest.approx(0.5)


def test_receptive_fields_with_padding() -> None:
    pre = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    rf = receptive_fields(pre, torch.tensor([0, 3]), torch.tensor([0, 2]), (3, 3), (1, 1))
    assert rf.shape == (2, 2, 3, 3)
    assert math.isinf(rf[0, 0, 0, 0].item())  # padding never fired
    assert rf[0, 0, 1, 1].item() == 0.0 and rf[0, 1, 2, 2].item() == pre[1, 1, 1].item()
    assert rf[1, 0, 0, :].tolist() == [9.0, 10.0, 11.0]  # centre (3, 2): rows 2..4, cols 1..3
    assert math.isinf(rf[1, 0, 2, 0].item())


def test_update_winners_touches_only_winner_maps() -> None:
    w = torch.full((3, 1, 3, 3), 0.5)
    pre = torch.full((1, 5, 5), NEVER)
    pre[0, 2, 2] = 1.0  # one presynaptic spike, at the winner's centre, before the post spike
    winners = torch.tensor([[1, 2, 2]])
    out = update_winners(w, pre, winners, torch.tensor([2.0]), P, (1, 1))
    assert torch.equal(out[0], w[0]) and torch.equal(out[2], w[2])
    assert out[1, 0, 1, 1].item() == pytest.approx(0.5 + 0.04 * 0.25)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert torch.allclose(out[1, 0][mask], torch.full((8,), 0.5 - 0.03 * 0.25))
    assert torch.equal(w, torch.full((3, 1, 3, 3), 0.5))  # not mutated
    assert torch.equal(update_winners(w, pre, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), P, (1, 1)), w)


def test_bad_rates_rejected() -> None:
    with pytest.raises(ValueError, match="a_plus"):
        check_params(STDPParams(0.0, 0.1))
    with pytest.raises(ValueError, match="a_minus"):
        check_params(STDPParams(0.1, 1.5))
