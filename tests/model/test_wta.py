"""WTA picks the right winners on crafted spike maps, in each mode, including ties by membrane."""
from __future__ import annotations

import pytest
import torch

from model.learning.wta import select_winners, winner_mask

INF = float("inf")


def _maps(c: int = 3, h: int = 6, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((c, h, w), INF), torch.zeros(c, h, w)


def _rows(winners) -> list[tuple[int, int, int]]:
    return [tuple(r) for r in winners.index.tolist()]


def test_global_first_spike_per_map() -> None:
    t, v = _maps()
    t[0, 1, 1], t[0, 4, 4] = 3.0, 1.0  # map 0: (4, 4) fires first
    t[1, 0, 5] = 2.0
    # map 2 never fires: no winner
    w = select_winners(t, v, "global")
    assert _rows(w) == [(0, 4, 4), (1, 0, 5)]  # ordered by time
    assert w.time.tolist() == [1.0, 2.0]


def test_global_tie_goes_to_larger_pre_reset_membrane() -> None:
    t, v = _maps()
    t[0, 1, 1] = t[0, 3, 3] = 2.0
    v[0, 1, 1], v[0, 3, 3] = 11.0, 14.0
    assert _rows(select_winners(t, v, "global")) == [(0, 3, 3)]
    v[0, 1, 1] = 15.0
    assert _rows(select_winners(t, v, "global")) == [(0, 1, 1)]


def test_global_max_winners_keeps_earliest() -> None:
    t, v = _maps()
    t[0, 0, 0], t[1, 0, 0], t[2, 0, 0] = 5.0, 1.0, 3.0
    assert _rows(select_winners(t, v, "global", max_winners=2)) == [(1, 0, 0), (2, 0, 0)]


def test_local_inhibits_other_maps_within_radius_only() -> None:
    t, v = _maps(2, 8, 8)
    t[0, 2, 2] = 1.0  # winner
    t[1, 3, 3] = 2.0  # other map, inside radius 1 of (2, 2): inhibited
    t[1, 6, 6] = 3.0  # other map, far away: wins
    t[0, 2, 3] = 4.0  # same map next to the winner: not inhibited in 'local'
    w = select_winners(t, v, "local", radius=1, max_winners=5)
    assert _rows(w) == [(0, 2, 2), (1, 6, 6), (0, 2, 3)]
    # radius 0: only the same pixel is inhibited, so (1, 3, 3) wins too
    assert (1, 3, 3) in _rows(select_winners(t, v, "local", radius=0, max_winners=5))


def test_both_one_winner_per_map_and_lateral_inhibition() -> None:
    t, v = _maps(3, 8, 8)
    t[0, 2, 2] = 1.0
    t[0, 6, 6] = 1.5  # same map again: excluded in 'both'
    t[1, 3, 2] = 2.0  # inhibited by map 0's winner (radius 2)
    t[1, 7, 0] = 5.0  # map 1 still wins elsewhere
    t[2, 2, 4] = 1.0  # same time as map 0's winner, but weaker membrane -> second, inhibited
    v[2, 2, 4], v[0, 2, 2] = 10.0, 12.0
    t[2, 0, 7] = 6.0
    w = select_winners(t, v, "both", radius=2)
    assert _rows(w) == [(0, 2, 2), (1, 7, 0), (2, 0, 7)]
    assert w.time.tolist() == [1.0, 5.0, 6.0]


def test_tie_in_local_mode_by_membrane() -> None:
    t, v = _maps(2, 4, 4)
    t[0, 1, 1] = t[1, 1, 2] = 0.0
    v[0, 1, 1], v[1, 1, 2] = 10.5, 12.0
    assert _rows(select_winners(t, v, "both", radius=1)) == [(1, 1, 2)]


def test_no_spikes_no_winners_and_mask() -> None:
    t, v = _maps()
    for mode in ("global", "local", "both"):
        w = select_winners(t, v, mode)
        assert w.index.shape == (0, 3)
    t[1, 2, 3] = 0.0
    m = winner_mask(tuple(t.shape), select_winners(t, v, "both"))
    assert m.sum().item() == 1 and m[1, 2, 3]


def test_bad_arguments_are_rejected() -> None:
    t, v = _maps()
    with pytest.raises(ValueError, match="mode"):
        select_winners(t, v, "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius"):
        select_winners(t, v, "local", radius=-1)
    with pytest.raises(ValueError, match="shape"):
        select_winners(t, v[0], "local")


@pytest.mark.parametrize("mode", ["global", "local", "both"])
def test_sparse_selection_equals_dense_on_random_maps(mode: str) -> None:
    """select_winners_sparse on the fired neurons gives exactly the dense selection (many random maps)."""
    from model.learning.wta import select_winners_sparse

    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        c, h, w = 5, 9, 11
        fired = torch.rand(c, h, w, generator=g) < 0.15
        # few distinct times and membranes, so ties in time and in membrane both occur
        t = torch.where(fired, torch.randint(0, 3, (c, h, w), generator=g).float(), torch.tensor(INF))
        v = torch.where(fired, torch.randint(10, 13, (c, h, w), generator=g).float(), torch.tensor(0.0))
        dense = select_winners(t, v, mode, radius=trial % 3, max_winners=4 + trial % 5)
        flat = torch.nonzero(fired.flatten()).flatten()
        sparse = select_winners_sparse(flat, t.flatten()[flat], v.flatten()[flat], (c, h, w), mode,
                                       radius=trial % 3, max_winners=4 + trial % 5)
        assert _rows(sparse) == _rows(dense), (trial, mode)
        assert torch.equal(sparse.time, dense.time)


def test_sparse_selection_rejects_bad_input() -> None:
    from model.learning.wta import select_winners_sparse

    z = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="1-d"):
        select_winners_sparse(z, torch.zeros(2), torch.zeros(3), (1, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        select_winners_sparse(z, torch.zeros(3), torch.zeros(3), (1, 2, 2), "nearest")  # type: ignore[arg-type]
    empty = select_winners_sparse(z[:0], torch.zeros(0), torch.zeros(0), (1, 2, 2))
    assert empty.index.shape == (0, 3)
