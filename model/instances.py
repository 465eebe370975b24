"""HULK-SMASH instances (Kirkland et al. 2022) and stable object ids across steps.

HULK: every classification (Conv3) spike is decoded on its own (a one-hot S3 through the
linear decoder), giving one *instance* per spike: its pixel support (saliency > the
decoder threshold), bounding box and class.  The sparse path decodes all spikes of a step
in one compiled call (:meth:`model.sparse.SparseSpikeSEG.spike_supports`); the dense path
decodes them as one batch of one-hot maps (:func:`dense_spike_supports`).  At most
``max_spikes`` (64) spikes are decoded per step; beyond that an evenly spaced subset of the
raster-ordered spikes is taken (every region keeps representatives; the step's mask is not
affected) and the number skipped is reported.

ASH (Active Spike Hashing): per instance a binary feature x time matrix ``A[f, tau]`` = 1
iff Conv2 feature ``f`` spiked, ``tau`` steps ago (``tau < ash_window``), at a Conv2-grid
position inside the instance's support (pixel ``(y, x)`` -> ``(y // 2, x // 2)``).  Stored
as one uint64 of 36 feature bits per ``tau``.

SMASH::

    SMASH(a, b) = Jaccard(A_a, A_b) * IoU(bbox_a, bbox_b)
    Jaccard(A, B) = |A and B| / |A or B|        (0 when both are empty)
    IoU = |bbox_a intersect bbox_b| / |bbox_a union bbox_b|   (inclusive pixel boxes)

Instances of the same class with SMASH >= ``smash_tau`` are joined (connected components:
the relation is not transitive, the components are).  An object's mask is the union of
its instances' supports: ``area`` counts its pixels, ``bbox`` bounds them.

Ids: objects are matched to the previous step's by bbox IoU (greedy, highest first, same
class, IoU >= ``track_iou``); matched objects keep the id, others get ``next_id`` (never
reused within a stream); an object not seen this step is dropped.  ``reset`` = a fresh
:class:`InstanceState` (ids restart at 1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from stream.events import Instance

from .sparse import _decode_batch

MAX_SPIKES = 64
N_FEATURES = 36


@dataclass(frozen=True)
class InstanceParams:
    """``smash_tau``: join threshold in (0, 1]; ``ash_window``: steps of Conv2 history (>= 1,
    <= 1000); ``max_spikes``: per-step cap on decoded Conv3 spikes (1..4096);
    ``track_iou``: minimum bbox IoU to keep an id (0..1]."""

    smash_tau: float = 0.1
    ash_window: int = 10
    max_spikes: int = MAX_SPIKES
    track_iou: float = 0.1

    def __post_init__(self) -> None:
        if not (0 < self.smash_tau <= 1):
            raise ValueError(f"smash_tau={self.smash_tau} is not allowed; use 0 < smash_tau <= 1")
        if not (1 <= self.ash_window <= 1000):
            raise ValueError(f"ash_window={self.ash_window} is not allowed; use 1..1000 steps")
        if not (1 <= self.max_spikes <= 4096):
            raise ValueError(f"max_spikes={self.max_spikes} is not allowed; use 1..4096")
        if not (0 < self.track_iou <= 1):
            raise ValueError(f"track_iou={self.track_iou} is not allowed; use 0 < track_iou <= 1")


@dataclass
class InstanceState:
    """Conv2 spike history (ring of ``ash_window`` slots of per-position feature bits), the
    previous step's objects ``(id, cls, bbox)`` and the next free id.  ``None`` = fresh."""

    h2: int
    w2: int
    hist: np.ndarray  # (h2 * w2, ash_window) uint64: position-major, a cell's window is one cache line or two
    written: np.ndarray  # (ash_window, h2 * w2) int64: positions set in each slot (to clear it cheaply)
    n_written: np.ndarray  # (ash_window,) int64: how many of ``written[slot]`` are valid
    slot: int = -1  # slot of the newest step
    qmark: np.ndarray | None = None  # (h2 * w2,) int64 scratch of _ash: last instance stamp per Conv2 position
    qstamp: int = 0
    # pixel stamps of the group areas (_group_stats): uint8 per pixel, grown on demand, and the last stamp
    seen: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint8))
    seen_stamp: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    tracks: list[tuple[int, int, tuple[int, int, int, int]]] = field(default_factory=list)
    # ``tracks`` as (n, 5) int64 rows ``cls, x0, y0, x1, y1``, valid while ``tracks`` is the
    # list ``track_src`` (track_groups sets both; anything that replaces ``tracks`` drops them)
    track_rows: np.ndarray | None = None
    track_src: list[Any] | None = None
    next_id: int = 1
    skipped_spikes: int = 0  # spikes beyond max_spikes in the last step


def fresh_instance_state(height: int, width: int, params: InstanceParams) -> InstanceState:
    """Empty history for an ``height`` x ``width`` sensor (Conv2 grid H/2 x W/2)."""
    h2, w2 = height // 2, width // 2
    hist = np.zeros((h2 * w2, params.ash_window), np.uint64)
    written = np.zeros((params.ash_window, h2 * w2), np.int64)
    return InstanceState(h2, w2, hist, written, np.zeros(params.ash_window, np.int64),
                         qmark=np.full(h2 * w2, -1, np.int64), seen=np.zeros(height * width, np.uint8))


def reset_instance_state(state: InstanceState) -> InstanceState:
    """``state`` as :func:`fresh_instance_state` makes it, in place: the history cleared at the
    positions each slot wrote (not 2 x 1.8 MB at 346x260), no tracks, ids from 1.  ``qstamp``
    keeps counting, so ``qmark`` needs no clearing."""
    for slot in range(state.hist.shape[1]):
        state.hist[state.written[slot, : state.n_written[slot]], slot] = 0
    state.n_written[:] = 0
    state.slot = -1
    state.tracks = []
    state.next_id = 1
    state.skipped_spikes = 0
    return state


def record_conv2(state: InstanceState, s2: np.ndarray) -> None:
    """Push one step's Conv2 spikes (flat channels-last ``pos * 36 + f``) into the history.

    Mutates ``state`` (its ring buffer): the oldest slot is cleared and overwritten.
    """
    n = state.hist.shape[1]
    slot = (state.slot + 1) % n
    s2 = np.ascontiguousarray(s2, dtype=np.int64)
    state.n_written[slot] = _record(state.hist, slot, state.written[slot], int(state.n_written[slot]), s2)
    state.slot = slot


@njit(cache=True, nogil=True)
def _record(hist: np.ndarray, slot: int, written: np.ndarray, n_old: int, s2: np.ndarray) -> int:
    """Clear column ``slot`` of ``hist`` at its ``n_old`` written positions, then OR in bit ``f``
    at ``pos`` for each spike ``pos * 36 + f``; returns the number of distinct positions now
    listed in ``written``.

    Compiled: ``np.bitwise_or.at`` + ``np.unique`` cost ~0.2 ms per step at 4,000 Conv2 spikes.
    """
    for j in range(n_old):
        hist[written[j], slot] = 0
    n = 0
    # a position's spikes come together (Conv2 emits them position by position): OR them
    # into one word and write it once (any order stays correct: a position seen again is
    # ORed in again and listed once)
    cur = -1
    acc = np.uint64(0)
    for i in range(s2.shape[0]):
        pos = s2[i] // N_FEATURES
        if pos != cur:
            if cur >= 0:
                if hist[cur, slot] == 0:  # every spike sets a bit, so 0 means "not listed yet"
                    written[n] = cur
                    n += 1
                hist[cur, slot] |= acc
            cur = pos
            acc = np.uint64(0)
        acc |= np.uint64(1) << np.uint64(s2[i] - pos * N_FEATURES)
    if cur >= 0:  # the last run (written out twice on purpose: a sentinel iteration or an
        # inlined helper measured 10-50 % slower in this loop)
        if hist[cur, slot] == 0:
            written[n] = cur
            n += 1
        hist[cur, slot] |= acc
    return n


@njit(cache=True, nogil=True)
def _ash(
    offsets: np.ndarray, pixels: np.ndarray, w: int, h2: int, w2: int, hist: np.ndarray, newest: int,
    qmark: np.ndarray, stamp0: int,
) -> np.ndarray:
    """ASH matrices (B, window) uint64: bit f of ``[b, tau]`` = feature f spiked ``tau`` steps ago in b's support.

    A support's ~4 pixels per Conv2 cell read the history once (``qmark[q] == stamp0 + b``
    marks cell q done for instance b; stamps ``stamp0 .. stamp0 + B - 1`` must be new).
    A cell's history row is ORed in slot order (contiguous: vectorised) and put in ``tau``
    order once per instance.
    """
    n_slots = hist.shape[1]
    b_n = offsets.shape[0] - 1
    out = np.zeros((b_n, n_slots), np.uint64)
    acc = np.zeros(n_slots, np.uint64)
    slot = np.empty(n_slots, np.int64)  # history column of tau (no modulo per cell)
    for tau in range(n_slots):
        slot[tau] = (newest - tau) % n_slots
    u = np.uint64  # unsigned indices: no negative-index wraparound (see model.sparse._U)
    row0 = 0  # start of the row of the last pixel: supports run along rows, so divide only
    yy = 0  # when the row changes (a runtime division costs ~25 cycles)
    for b in range(b_n):
        st = stamp0 + b
        for s in range(n_slots):
            acc[u(s)] = 0
        for j in range(offsets[b], offsets[b + 1]):
            o = pixels[u(j)]
            if o < row0 or o >= row0 + w:
                yy = o // w
                row0 = yy * w
            y = yy >> 1
            x = (o - row0) >> 1
            if y >= h2 or x >= w2:
                continue
            q = u(y * w2 + x)
            if qmark[q] == st:
                continue
            qmark[q] = st
            for s in range(n_slots):
                acc[u(s)] |= hist[q, u(s)]
        for tau in range(n_slots):
            out[u(b), u(tau)] = acc[u(slot[tau])]
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index of two binary matrices given as uint64 bit rows (0 when both are empty)."""
    inter = int(np.bitwise_count(a & b).sum())
    union = int(np.bitwise_count(a | b).sum())
    return inter / union if union else 0.0


@njit(cache=True, nogil=True)
def bbox_iou(a: tuple[int, int, int, int] | np.ndarray, b: tuple[int, int, int, int] | np.ndarray) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return float(inter) / float(union) if union > 0 else 0.0


@njit(cache=True, nogil=True)
def _popcount(v: np.uint64) -> int:
    """Set bits of a uint64 (SWAR; numba has no popcount intrinsic for numpy ints)."""
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((v * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True, nogil=True)
def _smash_labels(ash: np.ndarray, bboxes: np.ndarray, classes: np.ndarray, tau: float) -> np.ndarray:
    """Object label per instance, in order of first instance: the connected components of
    "same class and SMASH = Jaccard(ASH) x IoU(bbox) >= ``tau``".

    Lazy: a pair already in one component is not scored (its edge could not change the
    components), and components are kept as a label per instance, relabelled on a join
    (<= B - 1 joins of <= B labels), so that test is two loads.  A step's spikes mostly sit
    on a few objects (~4 components of 64 instances on the scene), so after the first joins
    nearly every pair is skipped (~120 of 2,016 pairs scored) instead of scoring every pair
    into a B x B matrix and labelling that.  The Jaccard term needs the boxes to overlap
    (else SMASH is 0) and uses ``|A or B| = |A| + |B| - |A and B|`` with per-instance
    popcounts.
    """
    b_n, n_slots = ash.shape
    cnt = np.zeros(b_n, np.int64)
    for i in range(b_n):
        for s in range(n_slots):
            cnt[i] += _popcount(ash[i, s])
    comp = np.arange(b_n)
    for i in range(b_n):
        ci = classes[i]
        for j in range(i + 1, b_n):
            if classes[j] != ci or comp[j] == comp[i]:
                continue
            iw = min(bboxes[i, 2], bboxes[j, 2]) - max(bboxes[i, 0], bboxes[j, 0]) + 1
            ih = min(bboxes[i, 3], bboxes[j, 3]) - max(bboxes[i, 1], bboxes[j, 1]) + 1
            if iw <= 0 or ih <= 0:
                continue
            it = iw * ih
            un = (bboxes[i, 2] - bboxes[i, 0] + 1) * (bboxes[i, 3] - bboxes[i, 1] + 1) + \
                (bboxes[j, 2] - bboxes[j, 0] + 1) * (bboxes[j, 3] - bboxes[j, 1] + 1) - it
            inter = 0
            for s in range(n_slots):
                inter += _popcount(ash[i, s] & ash[j, s])
            union = cnt[i] + cnt[j] - inter
            jac = inter / union if union > 0 else 0.0
            if jac * (it / un if un > 0 else 0.0) >= tau:
                keep, gone = min(comp[i], comp[j]), max(comp[i], comp[j])
                for m in range(b_n):
                    if comp[m] == gone:
                        comp[m] = keep
    labels = np.full(b_n, -1, np.int64)
    remap = np.full(b_n, -1, np.int64)
    k = 0
    for i in range(b_n):
        if remap[comp[i]] < 0:
            remap[comp[i]] = k
            k += 1
        labels[i] = remap[comp[i]]
    return labels


def select_spikes(s3: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """At most ``cap`` spikes: all of them, or an evenly spaced subset of the raster order."""
    n = len(s3)
    if n <= cap:
        return s3, 0
    return s3[_picks(n, cap)], n - cap


@functools.lru_cache(maxsize=256)
def _picks(n: int, cap: int) -> np.ndarray:
    """Indices of ``cap`` evenly spaced picks out of ``n`` (cached: ``np.linspace`` cost ~30 µs
    of Python per step, and a stream's spike counts repeat)."""
    pick = np.linspace(0, n - 1, cap).round().astype(np.int64)
    pick.flags.writeable = False
    return pick


def group_instances(
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, classes: np.ndarray,
    ash: np.ndarray, tau: float, state: InstanceState | None = None,
) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """SMASH grouping: ``(cls, bbox, area)`` per object, in order of first instance.

    Instances with an empty support are ignored.  Only same-class instances join.
    ``state``: its pixel stamp map is used for the areas (None: a fresh one for this call).
    """
    seen, stamp = _pixel_stamps(state, pixels)
    g = _group_all(offsets, pixels, np.ascontiguousarray(bboxes).astype(np.int64),
                   np.ascontiguousarray(classes).astype(np.int64), np.ascontiguousarray(ash), seen, stamp,
                   float(tau))
    return [(int(r[0]), (int(r[1]), int(r[2]), int(r[3]), int(r[4])), int(r[5])) for r in g.tolist()]


def _pixel_stamps(state: InstanceState | None, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel stamp map of :func:`_group_stats` (the state's, grown to cover ``pixels``) and its stamp."""
    need = int(pixels.max()) + 1 if len(pixels) else 1
    if state is None:
        return np.zeros(need, np.uint8), np.zeros(1, np.int64)
    if len(state.seen) < need:
        state.seen = np.zeros(need, np.uint8)
    return state.seen, state.seen_stamp


@njit(cache=True, nogil=True)
def _group_all(
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, classes: np.ndarray, ash: np.ndarray,
    seen: np.ndarray, stamp: np.ndarray, tau: float,
) -> np.ndarray:
    """(n_objects, 6) int64 rows ``cls, x0, y0, x1, y1, area``: the whole grouping compiled
    (the numpy glue around the kernels cost ~0.1 ms per step); ``seen``, ``stamp``: see
    :func:`_group_stats`."""
    b_n = offsets.shape[0] - 1
    n_keep = 0
    keep = np.empty(b_n, np.int64)
    for b in range(b_n):
        if offsets[b + 1] > offsets[b]:
            keep[n_keep] = b
            n_keep += 1
    if n_keep == 0:
        return np.zeros((0, 6), np.int64)
    keep = keep[:n_keep]
    ash_k = np.empty((n_keep, ash.shape[1]), np.uint64)
    bb_k = np.empty((n_keep, 4), np.int64)
    cls_k = np.empty(n_keep, np.int64)
    for i in range(n_keep):
        ash_k[i] = ash[keep[i]]
        bb_k[i] = bboxes[keep[i]]
        cls_k[i] = classes[keep[i]]
    labels = _smash_labels(ash_k, bb_k, cls_k, tau)
    n_g = 0
    for i in range(n_keep):
        n_g = max(n_g, labels[i] + 1)
    stats = _group_stats(offsets, pixels, bboxes, keep, labels, n_g, seen, stamp)
    out = np.empty((n_g, 6), np.int64)
    first = np.full(n_g, -1, np.int64)
    for i in range(n_keep):
        if first[labels[i]] < 0:
            first[labels[i]] = keep[i]
    for g in range(n_g):
        out[g, 0] = classes[first[g]]
        for c in range(5):
            out[g, 1 + c] = stats[g, c]
    return out


@njit(cache=True, nogil=True)
def _group_stats(
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, keep: np.ndarray, labels: np.ndarray,
    n_g: int, seen: np.ndarray, stamp: np.ndarray,
) -> np.ndarray:
    """(n_g, 5) int64: union bbox (x0, y0, x1, y1) and area (distinct pixels) of each group.

    A member's bbox is its support's pixel bbox, so the group bbox is the union of member
    bboxes.  The area counts distinct pixels group by group with ``seen``, a uint8 stamp per
    pixel (flat index; longer than the largest, zero or stamped earlier) and ``stamp[0]``,
    the last stamp used: a pixel is new to the group when its stamp differs; after 255
    stamps the map is cleared.  (A mark grid over each group's bbox needed a division per
    support row for the pixel's y and an allocation per group: ~20 us per step at 64 spikes;
    ``np.unique`` of the concatenated supports ~0.3 ms.)
    """
    out = np.zeros((n_g, 5), np.int64)
    for g in range(n_g):
        out[g, 0] = 1 << 40
        out[g, 1] = 1 << 40
        out[g, 2] = -1
        out[g, 3] = -1
    # members by group (counting sort, in instance order within a group)
    beg = np.zeros(n_g + 1, np.int64)
    for i in range(keep.shape[0]):
        g = labels[i]
        beg[g + 1] += 1
        b = keep[i]
        out[g, 0] = min(out[g, 0], bboxes[b, 0])
        out[g, 1] = min(out[g, 1], bboxes[b, 1])
        out[g, 2] = max(out[g, 2], bboxes[b, 2])
        out[g, 3] = max(out[g, 3], bboxes[b, 3])
    for g in range(n_g):
        beg[g + 1] += beg[g]
    fill = beg[:n_g].copy()
    members = np.empty(keep.shape[0], np.int64)
    for i in range(keep.shape[0]):
        members[fill[labels[i]]] = keep[i]
        fill[labels[i]] += 1
    st = stamp[0]
    for g in range(n_g):
        st += 1
        if st > 255:
            seen[:] = 0
            st = 1
        mark = np.uint8(st)
        area = 0
        for m in range(beg[g], beg[g + 1]):
            b = members[m]
            for j in range(offsets[b], offsets[b + 1]):
                o = pixels[j]
                if seen[o] != mark:
                    seen[o] = mark
                    area += 1
        out[g, 4] = area
    stamp[0] = st
    return out


def track(
    objs: list[tuple[int, tuple[int, int, int, int], int]], state: InstanceState, track_iou: float
) -> list[Instance]:
    """Give objects stable ids by greedy bbox-IoU matching with the previous step (mutates ``state``).

    Pairs (object, track) of the same class with IoU >= ``track_iou`` are taken best first
    (ties: lower object index, then lower track index); each object and track once.
    """
    rows = np.array([[c, *bb, a] for c, bb, a in objs], np.int64).reshape(-1, 6)
    return track_groups(rows, state, track_iou)


def track_groups(groups: np.ndarray, state: InstanceState, track_iou: float) -> list[Instance]:
    """:func:`track` for objects as (n, 6) int64 rows ``cls, x0, y0, x1, y1, area`` (what
    :func:`_group_all` returns): no conversion to tuples and back (~10-20 µs per step)."""
    n_o = groups.shape[0]
    prev = state.tracks
    boxes = np.ascontiguousarray(groups[:, :5])
    match: list[int] = []
    if n_o and prev:
        tracked = state.track_rows
        if tracked is None or state.track_src is not prev:  # tracks set elsewhere (reset, tests)
            tracked = np.array([[c, *bb] for _i, c, bb in prev], np.int64).reshape(-1, 5)
        match = _match(boxes, tracked, float(track_iou)).tolist()
    out = []
    tracks = []
    nid = state.next_id
    for i, (cls, x0, y0, x1, y1, area) in enumerate(groups.tolist()):
        if match and match[i] >= 0:
            oid = prev[match[i]][0]
        else:
            oid = nid
            nid += 1
        bbox = (x0, y0, x1, y1)
        out.append(Instance(oid, cls, bbox, area))  # positional: ~0.5 µs less each
        tracks.append((oid, cls, bbox))
    state.next_id = nid
    state.tracks = state.track_src = tracks
    state.track_rows = boxes  # the rows of ``tracks``, for the next step's matching
    return out


@njit(cache=True, nogil=True)
def _match(ob: np.ndarray, tb: np.ndarray, thr: float) -> np.ndarray:
    """Greedy matching of :func:`track`: rows ``cls, x0, y0, x1, y1``; the track index per object or -1."""
    n_o, n_t = ob.shape[0], tb.shape[0]
    ious = np.empty(n_o * n_t)
    pi = np.empty(n_o * n_t, np.int64)
    pj = np.empty(n_o * n_t, np.int64)
    n = 0
    for i in range(n_o):
        for j in range(n_t):
            if ob[i, 0] != tb[j, 0]:
                continue
            v = bbox_iou(ob[i, 1:], tb[j, 1:])
            if v >= thr:
                ious[n] = -v
                pi[n] = i
                pj[n] = j
                n += 1
    order = np.argsort(ious[:n], kind="mergesort")  # stable: ties keep (i, j) order
    match = np.full(n_o, -1, np.int64)
    used = np.zeros(n_t, np.bool_)
    for k in range(n):
        i = pi[order[k]]
        j = pj[order[k]]
        if match[i] >= 0 or used[j]:
            continue
        match[i] = j
        used[j] = True
    return match


def instances_step(
    supports: tuple[np.ndarray, np.ndarray, np.ndarray], classes: np.ndarray, s2: np.ndarray,
    width: int, state: InstanceState, params: InstanceParams,
) -> tuple[list[Instance], InstanceState]:
    """One step of HULK-SMASH from per-spike supports (either producer).

    ``supports`` = (offsets, pixels, bboxes) as from ``SparseSpikeSEG.spike_supports``;
    ``classes``: 1-based class per decoded spike; ``s2``: this step's Conv2 spikes (flat
    channels-last).  Returns the objects with stable ids and the (mutated) state.
    Instances' ``cls`` is 1-based like the mask values.
    """
    record_conv2(state, s2)
    offsets, pixels, bboxes = supports
    if len(classes) == 0:
        state.tracks = []
        return [], state
    if state.qmark is None:
        state.qmark = np.full(state.h2 * state.w2, -1, np.int64)
    ash = _ash(offsets, pixels, width, state.h2, state.w2, state.hist, state.slot, state.qmark, state.qstamp)
    state.qstamp += len(offsets)
    objs = group_instances(offsets, pixels, bboxes, classes, ash, params.smash_tau, state)
    return track(objs, state, params.track_iou), state


def sparse_instances(
    model: Any, sstate: Any, out: Any, state: InstanceState | None, params: InstanceParams,
    supports: tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray], int] | None = None,
) -> tuple[list[Instance], InstanceState]:
    """HULK-SMASH on the sparse path: call right after ``model.step`` (same step).

    ``model``: :class:`model.sparse.SparseSpikeSEG`; ``sstate``/``out`` its state and output.
    ``supports``: ``(spikes, supports, skipped)`` already decoded for
    ``select_spikes(out.s3, params.max_spikes)`` (the node decodes them on helper threads);
    None = decode them here.
    """
    g = sstate.grid
    if state is None:
        state = fresh_instance_state(g.h, g.w, params)
    if supports is None:
        spikes, skipped = select_spikes(out.s3, params.max_spikes)
        sup = model.spike_supports(sstate, spikes) if len(spikes) else empty_supports()
    else:
        spikes, sup, skipped = supports
    state.skipped_spikes = skipped
    classes = spikes % model.n_classes + 1
    return instances_step(sup, classes, out.s2, g.w, state, params)


def sparse_hulk(
    model: Any, sstate: Any, out: Any, state: InstanceState | None, params: InstanceParams,
    spikes: np.ndarray, skipped: int, scratch: dict[str, np.ndarray] | None = None, at: Any = None,
) -> tuple[list[Instance], InstanceState]:
    """:func:`sparse_instances` for ``spikes`` (= ``select_spikes(out.s3, params.max_spikes)``)
    with the supports, the Conv2 history, ASH and SMASH grouping in ONE compiled call
    (:func:`_hulk`); only the id tracking is Python.  Same objects, ids and state as
    :func:`sparse_instances`.  ``scratch``/``at``: as :meth:`SparseSpikeSEG.spike_supports`
    (a helper thread decoding a step while the next one runs)."""
    g = sstate.grid
    if state is None:
        state = fresh_instance_state(g.h, g.w, params)
    if state.qmark is None:
        state.qmark = np.full(state.h2 * state.w2, -1, np.int64)
    if len(state.seen) < g.h * g.w:  # every support pixel lies on the sensor
        state.seen = np.zeros(g.h * g.w, np.uint8)
    args, (offsets, _pixels, _bboxes) = model.supports_args(sstate, spikes, scratch, at)
    n = state.hist.shape[1]
    slot = (state.slot + 1) % n
    n_written, groups = _hulk(
        *args, state.hist, slot, state.written[slot], int(state.n_written[slot]),
        np.ascontiguousarray(out.s2, dtype=np.int64), state.qmark, state.qstamp, float(params.smash_tau),
        state.seen, state.seen_stamp,
    )
    state.n_written[slot] = n_written
    state.slot = slot
    state.skipped_spikes = skipped
    if len(spikes) == 0:
        state.tracks = []
        return [], state
    state.qstamp += len(offsets)
    return track_groups(groups, state, params.track_iou), state


@njit(cache=True, nogil=True)
def _hulk(
    spikes: np.ndarray, n_cls: int, cut: float, w3t: np.ndarray, w2t: np.ndarray, k1t: np.ndarray,
    w4: int, h2: int, w2: int, h: int, w: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_next: np.ndarray, p2_pos: np.ndarray, p2_ch: np.ndarray,
    p2_off: np.ndarray, n_p2: int, p2_beg: np.ndarray,
    p1_head: np.ndarray, p1_hmark: np.ndarray, p1_next: np.ndarray, p1_ch: np.ndarray, p1_off: np.ndarray,
    t: int, gate: bool, stamp0: int,
    d3: np.ndarray, d3mark: np.ndarray, d3list: np.ndarray,
    d2: np.ndarray, d2mark: np.ndarray, d2list: np.ndarray, d2pos: np.ndarray,
    sal: np.ndarray, salmark: np.ndarray, sallist: np.ndarray,
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, loc: np.ndarray, w2p: np.ndarray, w3g: np.ndarray,
    blk: np.ndarray, nsl: np.ndarray, p1_pos: np.ndarray, n_p1: int, row_beg: np.ndarray, row_x: np.ndarray,
    bblk: np.ndarray, bslot: np.ndarray, bmark: np.ndarray, shared: bool,
    hist: np.ndarray, slot: int, written: np.ndarray, n_old: int, s2: np.ndarray,
    qmark: np.ndarray, qstamp: int, tau: float, seen: np.ndarray, seen_stamp: np.ndarray,
) -> tuple[int, np.ndarray]:
    """Per-spike supports (``model.sparse._decode_batch``), the Conv2 history push
    (:func:`_record`), ASH (:func:`_ash`) and SMASH grouping (:func:`_group_all`) as one
    compiled call: one dispatch and one GIL release per step instead of four (on the node's
    helper thread every kernel return waited for the GIL held by the model thread).
    Returns (positions written in ``slot``, the groups of :func:`_group_all`).

    The first 53 parameters repeat ``_decode_batch``'s (as ``SparseSpikeSEG.supports_args``
    builds them): flat arrays are what numba's dispatcher types fastest; one tuple argument
    would be typed element by element in Python on every call."""
    _decode_batch(spikes, n_cls, cut, w3t, w2t, k1t, w4, h2, w2, h, w,
                  p2_head, p2_hmark, p2_next, p2_pos, p2_ch, p2_off, n_p2, p2_beg,
                  p1_head, p1_hmark, p1_next, p1_ch, p1_off, t, gate, stamp0,
                  d3, d3mark, d3list, d2, d2mark, d2list, d2pos, sal, salmark, sallist,
                  offsets, pixels, bboxes, loc, w2p, w3g, blk, nsl, p1_pos, n_p1, row_beg, row_x, bblk, bslot, bmark, shared)
    n_written = _record(hist, slot, written, n_old, s2)
    if spikes.shape[0] == 0:
        return n_written, np.zeros((0, 6), np.int64)
    ash = _ash(offsets, pixels, w, h2, w2, hist, slot, qmark, qstamp)
    classes = spikes % n_cls + 1  # 1-based class per spike
    return n_written, _group_all(offsets, pixels, bboxes, classes, ash, seen, seen_stamp, tau)


def empty_supports() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, pixels, bboxes) of zero decoded spikes."""
    return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64)


def merge_supports(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate (offsets, pixels, bboxes) of consecutive spike chunks into one."""
    if len(parts) == 1:
        return parts[0]
    offs = [parts[0][0]]
    base = int(parts[0][0][-1])
    for o, _p, _b in parts[1:]:
        offs.append(o[1:] + base)
        base += int(o[-1])
    return np.concatenate(offs), np.concatenate([p for _o, p, _b in parts]), np.concatenate([b for _o, _p, b in parts])


def onehot_spikes(s3: Any) -> tuple[Any, Any]:
    """Dense S3 (1, n_cls, h, w) -> (B, n_cls, h, w) one-hot maps, one per spike (raster order
    of ``(y, x, cls)``, i.e. the channels-last order of the sparse path) and the flat
    channels-last index of each spike."""
    import torch

    _, n, h, w = s3.shape
    nz = torch.nonzero(s3[0].permute(1, 2, 0) > 0)  # (B, 3): y, x, k in channels-last order
    b = nz.shape[0]
    oh = torch.zeros((b, n, h, w), dtype=s3.dtype, device=s3.device)
    ar = torch.arange(b, device=s3.device)
    oh[ar, nz[:, 2], nz[:, 0], nz[:, 1]] = 1
    flat = (nz[:, 0] * w + nz[:, 1]) * n + nz[:, 2]
    return oh, flat


def dense_spike_supports(
    dout: Any, w1: Any, w2: Any, w3: Any, gate: bool, cut: float, cap: int = MAX_SPIKES
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, int]:
    """Per-spike supports on the dense path: the one-hot maps of all (capped) spikes go
    through ``model.decoder.decode_saliency`` as ONE batch (B = spikes).

    ``dout``: the dense ``EncoderOutput`` of a batch-1 step.  Returns ((offsets, pixels,
    bboxes), 1-based classes, skipped).  Memory: B x n_cls x H x W floats per stage.
    """
    import torch

    from .decoder import decode_saliency

    s3 = dout.classification_spikes
    oh, flat = onehot_spikes(s3)
    flat_np = flat.cpu().numpy()
    sel, skipped = select_spikes(flat_np, cap)
    if skipped:
        oh = oh[torch.as_tensor(np.searchsorted(flat_np, sel), device=oh.device)]
    b = oh.shape[0]
    h, w = dout.layer_spikes["conv1"].shape[-2:]
    if b == 0:
        return (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64)), np.zeros(0, np.int64), 0
    rep = lambda t: t.expand(b, *t.shape[1:])  # noqa: E731 - broadcast the step's maps over the batch
    batch = dout._replace(
        classification_spikes=oh,
        pooling_indices=tuple(rep(i) for i in dout.pooling_indices),
        layer_spikes={k: rep(v) for k, v in dout.layer_spikes.items()},
    )
    sal = decode_saliency(batch, w1, w2, w3, gate)  # (B, n_cls, H, W)
    k = torch.as_tensor(sel % s3.shape[1], device=sal.device)
    own = sal[torch.arange(b, device=sal.device), k]  # each spike's own class map
    sup = (own > cut).reshape(b, -1).cpu().numpy()
    offsets = np.zeros(b + 1, np.int64)
    offsets[1:] = np.cumsum(sup.sum(1))
    pixels = np.nonzero(sup)[1].astype(np.int64)
    bboxes = np.full((b, 4), -1, np.int64)
    for i in range(b):
        p = pixels[offsets[i]:offsets[i + 1]]
        if len(p):
            ys, xs = np.divmod(p, w)
            bboxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    return (offsets, pixels, bboxes), sel % s3.shape[1] + 1, skipped


@functools.lru_cache(maxsize=16)
def _unpool_table(h: int, w: int, device: Any) -> tuple[Any, Any]:
    """Constants of :func:`_unpool_crop` for (h, w) cells: each 2 x 2 window's top-left flat index
    in the (2h, 2w) output, and the flat step of window offsets 0..3."""
    import torch

    base = (2 * torch.arange(h, device=device)[:, None] * (2 * w) + 2 * torch.arange(w, device=device)[None, :])
    step = torch.tensor([0, 1, 2 * w, 2 * w + 1], device=device)
    return base, step


def _unpool_crop(v: Any, off: Any) -> Any:
    """Place ``v`` (B, C, h, w) into (B, C, 2h, 2w) at window offset ``off`` (0..3, row-major in
    2x2), as one ``max_unpool2d`` (each cell has its own 2 x 2 window, so the flat indices are
    distinct): three ops instead of six (the CUDA step is bound by its host ops), and on CPU
    ~0.25x the time of the one-hot product and permute it replaces."""
    import torch

    h, w = v.shape[-2:]
    base, step = _unpool_table(h, w, v.device)
    return torch.nn.functional.max_unpool2d(v, base + step[off], 2, stride=2, output_size=(2 * h, 2 * w))


def _gather_crop(a: Any, rb: Any, ys: Any, xs: Any, r0: int, n: int, pad: int) -> Any:
    """Windows ``a[rb, :, y + r0 : y + r0 + n, x + r0 : x + r0 + n]`` per spike from (R, C, h, w) maps
    zero-padded by ``pad`` (>= -r0 and >= r0 + n): returns (B, C, n, n)."""
    import torch

    ap = torch.nn.functional.pad(a, (pad, pad, pad, pad))
    r = torch.arange(n, device=a.device) + r0 + pad
    rows = (ys[:, None] + r)[:, :, None]  # (B, n, 1)
    cols = (xs[:, None] + r)[:, None, :]  # (B, 1, n)
    return ap[rb[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def spike_crops(dout: Any, w1: Any, w2: Any, w3: Any, gate: bool, rb: Any, ys: Any, xs: Any, ks: Any) -> tuple[Any, Any, Any]:
    """Saliency of each Conv3 spike on its own, in the 40 x 40 pixel crop it can reach.

    ``rb, ys, xs, ks``: (B,) batch row, H/4-grid position and class of each spike.  Returns
    (sal (B, 40, 40) float64, py (B, 40), px (B, 40)): the crop's pixel rows/columns
    (crop origin (4y - 18, 4x - 18)); entries outside the sensor are exactly 0.

    A Conv3 spike at (y, x) reaches pool2 cells y-3..y+3 (7 x 7), their unpooled S2 cells
    (14 x 14), the transposed W2 conv widens that by 2 (18 x 18 pool1 cells), unpooling
    doubles it (36 x 36 S1 cells), the transposed W1 conv widens by 2 again: 40 x 40.
    Stages (float64, exact with weights on the 2^-12 grid, like the full-frame decoder):
    D3 = W3[k] (the transposed conv of a one-hot is the kernel itself); the gate by S2 at
    the unpool target equals a product with P2 (the pooled max IS S2 at its index), so
    U2 = unpool(D3 * P2) in the crop [same for S1 / P1]; cells outside the sensor (or the
    pooling grid at odd sizes) are zeroed exactly where the full-frame transposed convs
    crop them.  Cost ~0.4 MMAC per spike instead of a full-frame pass per spike.
    """
    import torch
    import torch.nn.functional as F

    (h, w), (hs2, ws2) = dout.pooling_output_sizes
    idx1, idx2 = dout.pooling_indices  # (R, 4, hs2, ws2), (R, 36, h4, w4)
    p1, p2 = dout.layer_spikes["pool1"], dout.layer_spikes["pool2"]
    h4, w4 = p2.shape[-2:]
    f64 = torch.float64
    dev = ys.device
    # stage A: pool2 cells y-3..y+3; D3 = W3[k]; zero outside the pooling grid; gate by P2
    r7 = torch.arange(-3, 4, device=dev)
    qy, qx = ys[:, None] + r7, xs[:, None] + r7
    ok2 = ((qy >= 0) & (qy < h4))[:, :, None] & ((qx >= 0) & (qx < w4))[:, None, :]
    v2 = w3.to(f64)[ks] * ok2[:, None].to(f64)  # (B, 36, 7, 7)
    if gate:
        v2 = v2 * _gather_crop(p2.to(f64), rb, ys, xs, -3, 7, 4)
    i2 = _gather_crop(idx2, rb, ys, xs, -3, 7, 4)  # flat indices into the hs2 x ws2 S2 map
    off2 = ((torch.div(i2, ws2, rounding_mode="floor") - 2 * qy[:, None, :, None]) * 2
            + (i2 % ws2 - 2 * qx[:, None, None, :])).clamp(0, 3)
    u2 = _unpool_crop(v2, off2)  # (B, 36, 14, 14), S2 rows 2y-6 .. 2y+7
    # stage C: D2 on pool1 cells 2y-8 .. 2y+9 (18 x 18); zero outside the hs2 x ws2 grid
    d2 = F.conv_transpose2d(u2, w2.to(f64))  # (B, 4, 18, 18)
    r18 = torch.arange(-8, 10, device=dev)
    c1y, c1x = 2 * ys[:, None] + r18, 2 * xs[:, None] + r18
    ok1 = ((c1y >= 0) & (c1y < hs2))[:, :, None] & ((c1x >= 0) & (c1x < ws2))[:, None, :]
    v1 = d2 * ok1[:, None].to(f64)
    if gate:
        v1 = v1 * _gather_crop(p1.to(f64), rb, 2 * ys, 2 * xs, -8, 18, 10)
    i1 = _gather_crop(idx1, rb, 2 * ys, 2 * xs, -8, 18, 10)
    off1 = ((torch.div(i1, w, rounding_mode="floor") - 2 * c1y[:, None, :, None]) * 2
            + (i1 % w - 2 * c1x[:, None, None, :])).clamp(0, 3)
    u1 = _unpool_crop(v1, off1)  # (B, 4, 36, 36), pixels 4y-16 .. 4y+19
    # the polarity sum taken on the weights first (linear, exact on the grid): one output
    # channel instead of two, ~0.7x of this float64 conv's time on CPU
    sal = F.conv_transpose2d(u1, w1.to(f64).sum(1, keepdim=True))[:, 0]  # (B, 40, 40), pixels 4y-18 .. 4y+21
    r40 = torch.arange(-18, 22, device=dev)
    py, px = 4 * ys[:, None] + r40, 4 * xs[:, None] + r40
    okp = ((py >= 0) & (py < h))[:, :, None] & ((px >= 0) & (px < w))[:, None, :]
    return sal * okp.to(f64), py, px


def crop_spike_supports(
    dout: Any, w1: Any, w2: Any, w3: Any, gate: bool, cut: float, cap: int = MAX_SPIKES, row: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, int]:
    """Per-spike supports on the dense path (batch row ``row``): :func:`spike_crops` of all
    (capped) spikes as ONE batch, support = own-class saliency > ``cut``.

    Same result as :func:`dense_spike_supports` (a full-frame one-hot decode per spike) at
    a tiny fraction of the cost.  Returns ((offsets, pixels, bboxes), 1-based classes,
    skipped) like :func:`dense_spike_supports`.
    """
    return crop_spike_supports_rows(dout, w1, w2, w3, gate, cut, cap, [row])[0]


def crop_spike_supports_rows(
    dout: Any, w1: Any, w2: Any, w3: Any, gate: bool, cut: float, cap: int, rows: list[int]
) -> list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, int]]:
    """:func:`crop_spike_supports` of several batch rows (the steps of a window) at once.

    Each row keeps its own cap and selection; the crops of all rows' selected spikes run as
    one batch (one set of launches per window instead of per step: ~200 host ops each, which
    is what a GPU step waits for), with one host copy of the spike list and one of the
    supports.  Results per row, identical to the one-row calls.
    """
    import torch

    s3 = dout.classification_spikes  # (R, n, h4, w4)
    n_cls, h4, w4 = s3.shape[1:]
    w = dout.pooling_output_sizes[0][1]
    nz = torch.nonzero(s3.index_select(0, torch.as_tensor(rows, device=s3.device)).permute(0, 2, 3, 1) > 0)
    nz_np = nz.cpu().numpy()  # (N, 4): row slot, y, x, k; raster order within each row
    flat_np = (nz_np[:, 1] * w4 + nz_np[:, 2]) * n_cls + nz_np[:, 3]
    bounds = np.searchsorted(nz_np[:, 0], np.arange(len(rows) + 1))
    picks, sels, skips = [], [], []
    for j in range(len(rows)):
        flat = flat_np[bounds[j] : bounds[j + 1]]
        sel, skipped = select_spikes(flat, cap)
        sels.append(sel)
        skips.append(skipped)
        picks.append(bounds[j] + (np.searchsorted(flat, sel) if skipped else np.arange(len(flat))))
    take = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    counts_per_row = np.array([len(x) for x in sels], np.int64)
    b = len(take)
    if b:
        z = nz[torch.as_tensor(take, device=nz.device)]
        rb = torch.as_tensor(np.repeat(np.asarray(rows, np.int64), counts_per_row), device=nz.device)
        sal, py, px = spike_crops(dout, w1, w2, w3, gate, rb, z[:, 1], z[:, 2], z[:, 3])
        okp = (py >= 0)[:, :, None] & (px >= 0)[:, None, :]
        sup = (sal > cut) & okp
        flatpix = py[:, :, None] * w + px[:, None, :]
        bi, pix = torch.nonzero(sup.reshape(b, -1), as_tuple=True)
        pix_all = flatpix.reshape(b, -1)[bi, pix].cpu().numpy().astype(np.int64)
        per_spike = np.bincount(bi.cpu().numpy(), minlength=b)
    else:
        pix_all, per_spike = np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.zeros(b + 1, np.int64)
    starts[1:] = np.cumsum(per_spike)
    # bounding boxes of all supports at once (segments of pix_all; -1s for an empty one)
    bboxes_all = np.full((b, 4), -1, np.int64)
    full = per_spike > 0
    if full.any():
        ys, xs = np.divmod(pix_all, w)
        at = starts[:-1][full]
        bboxes_all[full] = np.stack([np.minimum.reduceat(xs, at), np.minimum.reduceat(ys, at),
                                     np.maximum.reduceat(xs, at), np.maximum.reduceat(ys, at)], 1)
    out = []
    a = 0
    for j in range(len(rows)):
        e = a + int(counts_per_row[j])
        if e == a:
            out.append((empty_supports(), np.zeros(0, np.int64), skips[j]))
            continue
        offsets = starts[a : e + 1] - starts[a]
        out.append(((offsets, pix_all[starts[a] : starts[e]], bboxes_all[a:e]), sels[j] % n_cls + 1, skips[j]))
        a = e
    return out
