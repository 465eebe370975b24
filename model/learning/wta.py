"""Winner-take-all (WTA) selection for STDP, as pure tensor functions.

Input: a layer's first-spike times ``t[c, y, x]`` over one sample (time step index,
``inf`` = did not fire) and its *pre-reset* membrane at that spike ``v[c, y, x]``.
Candidates are ordered by ``(t ascending, v descending, flat index ascending)``: the earlier
spike wins and a tie in time goes to the larger pre-reset membrane (the neuron that was
driven harder); an exact tie in both goes to the lower index, so results are deterministic.

Modes:

* ``global`` (intra-map): the first neuron to fire in a map wins that map for the sample;
  at most one winner per map.
* ``local`` (inter-map): winners are taken in order; each winner inhibits the *other*
  maps within Chebyshev radius ``r`` of its position (``|dy| ≤ r and |dx| ≤ r``), which
  then cannot win there.  Its own map is not inhibited, so one map may win at several
  places (up to ``max_winners``).
* ``both``: ``global`` and ``local`` together: one winner per map, and no two winners of
  different maps within radius ``r`` -- Kheradpisheh et al. 2018's setting, which forces
  maps to specialise on different places/features.

Alternative not taken: inhibiting the spikes *during* the simulation (so that inhibited
neurons never fire later).  For learning only the winners matter, and choosing them in
spike order from the uninhibited times gives the same winners for ``global`` mode and, for
``local``/``both``, the winners of a network whose inhibition acts on the winners only.  It
keeps the encoder's dynamics untouched and the selection a pure function.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numba
import numpy as np
import torch

WTAMode = Literal["global", "local", "both"]
MODES: tuple[str, ...] = ("global", "local", "both")


class Winners(NamedTuple):
    """``index``: ``(K, 3)`` long rows ``(c, y, x)`` in selection order; ``time``: ``(K,)`` spike times."""

    index: torch.Tensor
    time: torch.Tensor


def _order(times: torch.Tensor, memb: torch.Tensor) -> torch.Tensor:
    """Permutation sorting 1-d candidates by (time asc, membrane desc, position asc)."""
    by_v = torch.sort(-memb, stable=True).indices
    by_t = torch.sort(times[by_v], stable=True).indices
    return by_v[by_t]


def _global(times: torch.Tensor, memb: torch.Tensor, max_winners: int) -> Winners:
    C, H, W = times.shape
    t = times.reshape(C, -1)
    t_min = t.min(1).values
    cand = (t == t_min[:, None]) & torch.isfinite(t)
    score = torch.where(cand, memb.reshape(C, -1), torch.full_like(t, -torch.inf))
    flat = score.argmax(1)  # first maximal index on exact ties (documented torch behaviour)
    maps = torch.nonzero(torch.isfinite(t_min)).flatten()
    flat = flat[maps]
    tw, vw = t_min[maps], score[maps, flat]
    # cap at max_winners, keeping the earliest (then strongest, then lowest map index)
    keep = _order(tw, vw)[:max_winners]
    maps, flat, tw = maps[keep], flat[keep], tw[keep]
    index = torch.stack([maps, flat // W, flat % W], 1)
    return Winners(index, tw)


@numba.njit(cache=True, nogil=True)
def _scan(order: np.ndarray, c_of: np.ndarray, y_of: np.ndarray, x_of: np.ndarray, n_maps: int, radius: int,
          max_winners: int, one_per_map: bool, lateral: bool) -> np.ndarray:  # pragma: no cover - numba
    """Positions (into ``order``) of the accepted candidates, scanning ``order`` once.

    Equivalent to "repeatedly take the best still-eligible neuron" (eligibility only ever
    shrinks).  Compiled (numba) rather than a Python loop: one step at 346x260 can have
    thousands of fired Conv2 neurons, and the interpreted scan plus a full (C, H, W)
    inhibition array cost milliseconds per sample; the alternative of one pair of
    full-tensor reductions per winner was ~50x slower still (tiny ops, dispatch-bound).

    A candidate ``(c, y, x)`` is rejected when its map already won (``one_per_map``) or when
    a winner of *another* map lies within Chebyshev ``radius`` (``lateral``).  The check
    runs over the winners so far (at most ``max_winners``), so no (C, H, W) inhibition
    array is built: O(K * winners) instead of O(C * H * W) memory traffic per sample.
    """
    out = np.empty(min(max_winners, order.shape[0]), np.int64)
    won = np.zeros(n_maps, np.bool_)
    n = 0
    n_won = 0
    for k in range(order.shape[0]):
        j = order[k]
        c, y, x = c_of[j], y_of[j], x_of[j]
        if one_per_map and won[c]:
            continue
        if lateral:
            hit = False
            for q in range(n):
                i = order[out[q]]
                if c_of[i] != c and abs(y_of[i] - y) <= radius and abs(x_of[i] - x) <= radius:
                    hit = True
                    break
            if hit:
                continue
        out[n] = k
        n += 1
        if n >= max_winners:
            break
        if not won[c]:
            won[c] = True
            n_won += 1
            if one_per_map and n_won == n_maps:
                break
    return out[:n]


def select_winners_sparse(
    flat: torch.Tensor,
    times: torch.Tensor,
    membrane: torch.Tensor,
    shape: tuple[int, int, int],
    mode: WTAMode = "both",
    radius: int = 2,
    max_winners: int | None = None,
) -> Winners:
    """:func:`select_winners` on the fired neurons only (same rules, same results).

    ``flat`` (K,) long: flat indices into ``shape = (C, H, W)`` of the neurons that fired,
    in *ascending* order (as ``torch.nonzero`` returns them: the position tie-break relies on
    it); ``times`` and ``membrane`` (K,) their first-spike times and pre-reset membranes.
    Cost is O(K log K) for the sort plus a compiled scan, independent of H x W: this is what
    online adaptation calls with the few thousand neurons that spiked in one step.
    """
    if mode not in MODES:
        raise ValueError(f"WTA mode {mode!r} is not allowed; use one of {', '.join(MODES)}")
    if radius < 0:
        raise ValueError(f"WTA radius {radius} is negative; use an integer >= 0")
    if flat.dim() != 1 or times.shape != flat.shape or membrane.shape != flat.shape:
        raise ValueError(
            f"sparse WTA expects 1-d flat indices, times and membrane of one shape, got "
            f"{tuple(flat.shape)}, {tuple(times.shape)} and {tuple(membrane.shape)}"
        )
    C, H, W = shape
    k = C if max_winners is None else int(max_winners)
    if k < 1:
        raise ValueError(f"max_winners={k} is not allowed; use an integer >= 1")
    dev = times.device
    if flat.numel() == 0:
        return Winners(torch.zeros(0, 3, dtype=torch.long, device=dev), times.new_zeros(0))
    order = _order(times, membrane).cpu().numpy()
    f = flat.cpu().numpy().astype(np.int64)
    c_of, rem = np.divmod(f, H * W)
    y_of, x_of = np.divmod(rem, W)
    pos = _scan(order, c_of, y_of, x_of, C, int(radius), k, mode != "local", mode != "global")
    sel = order[pos]
    index = torch.from_numpy(np.stack([c_of[sel], y_of[sel], x_of[sel]], 1).reshape(-1, 3)).to(dev)
    return Winners(index, times[torch.from_numpy(sel).to(dev)])


def select_winners(
    times: torch.Tensor,
    membrane: torch.Tensor,
    mode: WTAMode = "both",
    radius: int = 2,
    max_winners: int | None = None,
) -> Winners:
    """Pick the STDP winners of one sample from first-spike ``times`` and pre-reset ``membrane``.

    ``times`` and ``membrane`` are ``(C, H, W)``.  ``max_winners`` caps the number of winners
    (default: ``C`` maps for ``global``/``both``, ``C`` as well for ``local`` so that a sample
    never does unbounded work).  Raises ValueError for a bad mode, radius or shape.
    """
    if mode not in MODES:
        raise ValueError(f"WTA mode {mode!r} is not allowed; use one of {', '.join(MODES)}")
    if radius < 0:
        raise ValueError(f"WTA radius {radius} is negative; use an integer >= 0")
    if times.dim() != 3 or times.shape != membrane.shape:
        raise ValueError(
            f"WTA expects (C, H, W) times and membrane of one shape, got {tuple(times.shape)} and {tuple(membrane.shape)}"
        )
    k = times.shape[0] if max_winners is None else int(max_winners)
    if k < 1:
        raise ValueError(f"max_winners={k} is not allowed; use an integer >= 1")
    if mode == "global":
        return _global(times, membrane, k)
    flat = torch.nonzero(torch.isfinite(times).flatten()).flatten()
    return select_winners_sparse(flat, times.flatten()[flat], membrane.flatten()[flat], tuple(times.shape),
                                 mode, radius, k)


def winner_mask(shape: tuple[int, int, int], winners: Winners, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(C, H, W)`` mask that is True at the winners (for plots and HUDs)."""
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    if winners.index.numel():
        m[winners.index[:, 0], winners.index[:, 1], winners.index[:, 2]] = True
    return m


def warm_up() -> None:
    """Compile (or load from numba's cache) the winner scan, so a streaming caller never pays it mid-stream."""
    z = np.zeros(1, np.int64)
    _scan(z, z, z, z, 1, 0, 1, True, True)
