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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from stream.events import Instance

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
    hist: np.ndarray  # (ash_window, h2 * w2) uint64
    written: list[np.ndarray]  # positions set in each slot (to clear it cheaply)
    slot: int = -1  # slot of the newest step
    tracks: list[tuple[int, int, tuple[int, int, int, int]]] = field(default_factory=list)
    next_id: int = 1
    skipped_spikes: int = 0  # spikes beyond max_spikes in the last step


def fresh_instance_state(height: int, width: int, params: InstanceParams) -> InstanceState:
    """Empty history for an ``height`` x ``width`` sensor (Conv2 grid H/2 x W/2)."""
    h2, w2 = height // 2, width // 2
    hist = np.zeros((params.ash_window, h2 * w2), np.uint64)
    return InstanceState(h2, w2, hist, [np.zeros(0, np.int64) for _ in range(params.ash_window)])


def record_conv2(state: InstanceState, s2: np.ndarray) -> None:
    """Push one step's Conv2 spikes (flat channels-last ``pos * 36 + f``) into the history.

    Mutates ``state`` (its ring buffer): the oldest slot is cleared and overwritten.
    """
    n = state.hist.shape[0]
    slot = (state.slot + 1) % n
    state.hist[slot, state.written[slot]] = 0
    pos = s2 // N_FEATURES
    bits = np.left_shift(np.uint64(1), (s2 % N_FEATURES).astype(np.uint64))
    np.bitwise_or.at(state.hist[slot], pos, bits)
    state.written[slot] = np.unique(pos)
    state.slot = slot


@njit(cache=True)
def _ash(offsets: np.ndarray, pixels: np.ndarray, w: int, h2: int, w2: int, hist: np.ndarray, newest: int) -> np.ndarray:
    """ASH matrices (B, window) uint64: bit f of ``[b, tau]`` = feature f spiked ``tau`` steps ago in b's support."""
    n_slots = hist.shape[0]
    b_n = offsets.shape[0] - 1
    out = np.zeros((b_n, n_slots), np.uint64)
    for b in range(b_n):
        for j in range(offsets[b], offsets[b + 1]):
            o = pixels[j]
            y = (o // w) >> 1
            x = (o - (o // w) * w) >> 1
            if y >= h2 or x >= w2:
                continue
            q = y * w2 + x
            for tau in range(n_slots):
                out[b, tau] |= hist[(newest - tau) % n_slots, q]
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index of two binary matrices given as uint64 bit rows (0 when both are empty)."""
    inter = int(np.bitwise_count(a & b).sum())
    union = int(np.bitwise_count(a | b).sum())
    return inter / union if union else 0.0


def bbox_iou(a: tuple[int, int, int, int] | np.ndarray, b: tuple[int, int, int, int] | np.ndarray) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return float(inter) / float(union) if union > 0 else 0.0


def _pairwise(ash: np.ndarray, bboxes: np.ndarray) -> np.ndarray:
    """SMASH matrix (B, B), vectorised (64 spikes: 2,016 pairs in one numpy pass)."""
    inter = np.bitwise_count(ash[:, None, :] & ash[None, :, :]).sum(-1).astype(np.float64)
    union = np.bitwise_count(ash[:, None, :] | ash[None, :, :]).sum(-1).astype(np.float64)
    jac = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    bx = bboxes.astype(np.int64)
    iw = np.minimum(bx[:, None, 2], bx[None, :, 2]) - np.maximum(bx[:, None, 0], bx[None, :, 0]) + 1
    ih = np.minimum(bx[:, None, 3], bx[None, :, 3]) - np.maximum(bx[:, None, 1], bx[None, :, 1]) + 1
    it = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (bx[:, 2] - bx[:, 0] + 1) * (bx[:, 3] - bx[:, 1] + 1)
    un = area[:, None] + area[None, :] - it
    iou = np.divide(it.astype(np.float64), un, out=np.zeros(it.shape), where=un > 0)
    return jac * iou


def _components(adj: np.ndarray) -> np.ndarray:
    """Connected-component label per node (union-find), labels in order of first node."""
    n = adj.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adj, 1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(r, len(remap)) for r in roots], np.int64)


def select_spikes(s3: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """At most ``cap`` spikes: all of them, or an evenly spaced subset of the raster order."""
    n = len(s3)
    if n <= cap:
        return s3, 0
    pick = np.linspace(0, n - 1, cap).round().astype(np.int64)
    return s3[pick], n - cap


def group_instances(
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, classes: np.ndarray,
    ash: np.ndarray, width: int, tau: float,
) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """SMASH grouping: ``(cls, bbox, area)`` per object, in order of first instance.

    Instances with an empty support are ignored.  Only same-class instances join.
    """
    keep = np.nonzero(offsets[1:] > offsets[:-1])[0]
    if len(keep) == 0:
        return []
    sm = _pairwise(ash[keep], bboxes[keep])
    same = classes[keep][:, None] == classes[keep][None, :]
    labels = _components((sm >= tau) & same)
    objs = []
    for g in range(int(labels.max()) + 1):
        members = keep[labels == g]
        pix = np.unique(np.concatenate([pixels[offsets[b]:offsets[b + 1]] for b in members]))
        ys, xs = np.divmod(pix, width)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        objs.append((int(classes[members[0]]), bbox, int(len(pix))))
    return objs


def track(
    objs: list[tuple[int, tuple[int, int, int, int], int]], state: InstanceState, track_iou: float
) -> list[Instance]:
    """Give objects stable ids by greedy bbox-IoU matching with the previous step (mutates ``state``)."""
    pairs = []
    for i, (cls, bb, _a) in enumerate(objs):
        for j, (_tid, tcls, tbb) in enumerate(state.tracks):
            if cls == tcls:
                iou = bbox_iou(bb, tbb)
                if iou >= track_iou:
                    pairs.append((-iou, i, j))
    pairs.sort()
    ids: dict[int, int] = {}
    used: set[int] = set()
    for _neg, i, j in pairs:
        if i in ids or j in used:
            continue
        ids[i] = state.tracks[j][0]
        used.add(j)
    out = []
    for i, (cls, bb, area) in enumerate(objs):
        if i not in ids:
            ids[i] = state.next_id
            state.next_id += 1
        out.append(Instance(id=ids[i], cls=cls, bbox=bb, area=area))
    state.tracks = [(inst.id, inst.cls, inst.bbox) for inst in out]
    return out


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
    ash = _ash(offsets, pixels, width, state.h2, state.w2, state.hist, state.slot)
    objs = group_instances(offsets, pixels, bboxes, classes, ash, width, params.smash_tau)
    return track(objs, state, params.track_iou), state


def sparse_instances(
    model: Any, sstate: Any, out: Any, state: InstanceState | None, params: InstanceParams
) -> tuple[list[Instance], InstanceState]:
    """HULK-SMASH on the sparse path: call right after ``model.step`` (same step).

    ``model``: :class:`model.sparse.SparseSpikeSEG`; ``sstate``/``out`` its state and output.
    """
    g = sstate.grid
    if state is None:
        state = fresh_instance_state(g.h, g.w, params)
    spikes, skipped = select_spikes(out.s3, params.max_spikes)
    state.skipped_spikes = skipped
    if len(spikes):
        supports = model.spike_supports(sstate, spikes)
    else:
        supports = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64))
    classes = spikes % model.n_classes + 1
    return instances_step(supports, classes, out.s2, g.w, state, params)


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
