"""Golden trajectories for IF and both LIF modes (hand-computed), fire-once, no mutation."""
from __future__ import annotations

import pytest
import torch

from model.neurons import (
    NeuronParams,
    if_step,
    lif_multiplicative_step,
    lif_subtractive_step,
    neuron_step,
)





def _run(fn, inputs: list[list[float]], params: NeuronParams):
    """Feed per-step inputs (one value per channel) to ``fn``; return spikes and membranes per step."""
    state = None
    spikes, volts = [], []
    for row in inputs:
        i = torch.tensor(row, dtype=torch.float32).view(len(row), 1, 1)
        s, state = fn(i, state, params)
        spikes.append(s.flatten().tolist())
        volts.append(state.v.flatten().tolist())
    return spikes, volts


def test_subtractive_lif_golden_with_clamp_reset_and_per_channel_threshold() -> None:
    # channel 0: theta 10, channel 1: theta 5; lambda 2.  V <- max(V + I - 2, 0); spike at V >= theta; reset to 0.
    p = NeuronParams(theta=torch.tensor([10.0, 5.0]).view(2, 1, 1), leak="subtractive", lam=2.0)
    inputs = [[5, 5], [5, 5], [5, 5], [0, 0], [12, 12], [1, 1], [0, 0]]
    spikes, volts = _run(lif_subtractive_step, inputs, p)
    # ch0: 3, 6, 9, 7, 17->spike->0, max(-1,0)=0, 0
    # ch1: 3, 6->spike->0, 3, 1, 11->spike->0, 0, 0
    assert [s[0] for s in spikes] == [0, 0, 0, 0, 1, 0, 0]
    assert [s[1] for s in spikes] == [0, 1, 0, 0, 1, 0, 0]
    assert [v[0] for v in volts] == [3, 6, 9, 7, 0, 0, 0]
    assert [v[1] for v in volts] == [3, 0, 3, 1, 0, 0, 0]


def test_subtractive_lif_paper_values_one_step_needs_19() -> None:
    # IGARSS 2023 Conv1: theta 10, lambda 9: a single step fires only from I >= 19.
    p = NeuronParams(theta=torch.tensor(10.0), leak="subtractive", lam=9.0)
    s, st = lif_subtractive_step(torch.tensor([18.9, 19.0]), None, p)
    assert s.tolist() == [0.0, 1.0]
    assert st.v.tolist() == pytest.approx([9.9, 0.0])


def test_multiplicative_lif_golden() -> None:
    # V <- 0.5 V + I, theta 10: 8, 12->spike->0, 8, 4, 22->spike->0, negative input kept (no floor)
    p = NeuronParams(theta=torch.tensor(10.0), leak="multiplicative", beta=0.5)
    spikes, volts = _run(lif_multiplicative_step, [[8], [8], [8], [0], [20], [-3], [1]], p)
    assert [s[0] for s in spikes] == [0, 1, 0, 0, 1, 0, 0]
    assert [v[0] for v in volts] == [8, 0, 8, 4, 0, -3, -0.5]


def test_if_golden() -> None:
    p = NeuronParams(theta=torch.tensor(10.0), leak="none")
    spikes, volts = _run(if_step, [[4], [4], [4], [-3], [10], [13]], p)
    assert [s[0] for s in spikes] == [0, 0, 1, 0, 0, 1]
    assert [v[0] for v in volts] == [4, 8, 0, -3, 7, 0]


@pytest.mark.parametrize("leak", ["none", "subtractive", "multiplicative"])
def test_fire_once_never_fires_again_until_reset(leak: str) -> None:
    p = NeuronParams(theta=torch.tensor(1.0), leak=leak, lam=0.0, beta=1.0, fire_once=True)
    spikes, volts = _run(lambda i, s, q: neuron_step(i, s, q), [[1], [1], [1]], p)
    assert [s[0] for s in spikes] == [1, 0, 0]
    # after the first spike the neuron is silenced, not reset: it keeps integrating
    assert [v[0] for v in volts] == [0, 1, 2]
    # a fresh state (reset) lets it fire again
    s, st = neuron_step(torch.tensor([[[1.0]]]), None, p)
    assert s.item() == 1.0 and bool(st.fired.all())


def test_state_is_not_mutated_and_none_means_fresh() -> None:
    p = NeuronParams(theta=torch.tensor(10.0), leak="subtractive", lam=1.0)
    i = torch.full((1, 3, 3), 4.0)
    _, st1 = lif_subtractive_step(i, None, p)
    v_before = st1.v.clone()
    _, st2 = lif_subtractive_step(i, st1, p)
    assert torch.equal(st1.v, v_before)
    assert torch.equal(st2.v, torch.full((1, 3, 3), 6.0))
    assert torch.equal(i, torch.full((1, 3, 3), 4.0))


def test_unknown_leak_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="subtractive"):
        neuron_step(torch.zeros(1), None, NeuronParams(theta=torch.tensor(1.0), leak="bogus"))  # type: ignore[arg-type]
