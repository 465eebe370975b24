"""model.fused: the compiled neuron scan equals the eager one bit for bit; verify() catches a difference."""
from __future__ import annotations

import pytest
import torch

from model import fused
from model.encoder import scan_steps
from model.neurons import NeuronParams, NeuronState


def _currents(t: int, c: int, h: int, w: int, top: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand((t, c, h, w), generator=g) * top * 4096) / 4096


def test_compiled_scan_equals_eager_across_chunks_padding_and_fire_once() -> None:
    theta = torch.tensor([10.0, 6.0, 8.0]).view(3, 1, 1)
    scan = fused.CompiledScan(scan_steps)
    for p in (NeuronParams(theta, "subtractive", lam=1.6, fire_once=True), NeuronParams(theta, "none")):
        i = _currents(fused.CHUNK + 5, 3, 9, 11, 7.0)
        s_e, n_e = scan_steps(i, None, p)
        s_c, n_c = scan(i, None, p)  # a full chunk, then a padded one, the state carried between
        assert torch.equal(s_e, s_c) and torch.equal(n_e.v, n_c.v)
        assert (n_e.fired is None) == (n_c.fired is None)
        if p.fire_once:
            assert torch.equal(n_e.fired, n_c.fired)
        assert 50 < int(s_e.sum()) < s_e.numel() // 2  # neurons spike and reset
        # carried state: a second window from the first one's state
        j = _currents(4, 3, 9, 11, 7.0, seed=2)
        s_e2, n_e2 = scan_steps(j, n_e, p)
        s_c2, n_c2 = scan(j, n_c, p)
        assert torch.equal(s_e2, s_c2) and torch.equal(n_e2.v, n_c2.v)


def test_multiplicative_leak_stays_eager() -> None:
    p = NeuronParams(torch.full((2, 1, 1), 5.0), "multiplicative", beta=0.9)
    assert not fused.compilable(p)
    calls = []

    def eager(i: torch.Tensor, state: NeuronState | None, params: NeuronParams):
        calls.append(i.shape[0])
        return scan_steps(i, state, params)

    i = _currents(3, 2, 4, 4, 4.0)
    s, _ = fused.CompiledScan(eager)(i, None, p)
    assert calls == [3] and torch.equal(s, scan_steps(i, None, p)[0])


def test_verify_reports_a_scan_that_differs() -> None:
    p = NeuronParams(torch.full((3, 1, 1), 10.0), "none")  # the IF shape compiled above (inductor's cache)

    def wrong_eager(i: torch.Tensor, state: NeuronState | None, params: NeuronParams):
        return scan_steps(i, state, params._replace(theta=params.theta * 2))

    scan = fused.CompiledScan(wrong_eager)
    fused.verify(fused.CompiledScan(scan_steps), [(3, 9, 11)], (p,), torch.device("cpu"))
    with pytest.raises(AssertionError, match=r"differs from eager on a \(3, 9, 11\) layer"):
        fused.verify(scan, [(3, 9, 11)], (p,), torch.device("cpu"))
