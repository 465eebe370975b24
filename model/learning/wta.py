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


def _greedy(times: torch.Tensor, memb: torch.Tensor, radius: int, max_winners: int, one_per_map: bool) -> Winners:
    """Scan fired neurons in candidate order; accept those not inhibited by an earlier winner.

    Equivalent to "repeatedly take the best still-eligible neuron" (eligibility only ever
    shrinks), but costs one sort plus an O(1) check per candidate.  The alternative, one
    pair of full-tensor reductions per winner, was ~50x slower on 2 CPU cores (tiny ops
    dominated by dispatch).  The scan runs on host numpy: selection is control flow, and
    the winners (≤ max_winners rows) are all that goes back to the device.
    """
    C, H, W = times.shape
    fired = torch.nonzero(torch.isfinite(times).flatten()).flatten()
    if fired.numel() == 0:
        return Winners(torch.zeros(0, 3, dtype=torch.long, device=times.device), times.new_zeros(0))
    tf, vf = times.flatten()[fired], memb.flatten()[fired]
    order = fired[_order(tf, vf)].cpu().numpy()
    t_np = times.flatten().cpu().numpy()
    inhibited = np.zeros((C, H, W), dtype=bool)
    won_map = np.zeros(C, dtype=bool)
    rows: list[tuple[int, int, int]] = []
    tws: list[float] = []
    hw = H * W
    for flat in order.tolist():
        c, rem = divmod(flat, hw)
        y, x = divmod(rem, W)
        if (one_per_map and won_map[c]) or inhibited[c, y, x]:
            continue
        rows.append((c, y, x))
        tws.append(float(t_np[flat]))
        if len(rows) >= max_winners:
            break
        won_map[c] = True
        own = inhibited[c].copy()
        inhibited[:, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = True
        inhibited[c] = own  # a winner inhibits the *other* maps; its own map is handled by one_per_map
        if one_per_map and won_map.all():
            break
    index = torch.tensor(rows, dtype=torch.long, device=times.device)
    return Winners(index, torch.tensor(tws, dtype=times.dtype, device=times.device))


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
    return _greedy(times, membrane, radius, k, one_per_map=(mode == "both"))


def winner_mask(shape: tuple[int, int, int], winners: Winners, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(C, H, W)`` mask that is True at the winners (for plots and HUDs)."""
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    if winners.index.numel():
        m[winners.index[:, 0], winners.index[:, 1], winners.index[:, 2]] = True
    return m
