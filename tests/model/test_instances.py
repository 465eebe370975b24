"""HULK-SMASH grouping, stable ids, and per-spike decoding (batched == one at a time)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.decoder import decode_saliency
from model.encoder import Encoder
from model.instances import (
    InstanceParams,
    _smash_labels,
    bbox_iou,
    dense_spike_supports,
    fresh_instance_state,
    group_instances,
    instances_step,
    jaccard,
    onehot_spikes,
    record_conv2,
    select_spikes,
    sparse_hulk,
    sparse_instances,
    track,
)
from model.sparse import SparseSpikeSEG
from stream.config import build




pytestmark = pytest.mark.timeout(300)  # first run compiles the numba kernels (cached afterwards)

W = 64


def _canon(sup: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Supports with each instance's pixels sorted (the sparse path lists them unordered)."""
    offs, pix, boxes = sup
    return offs, np.concatenate([np.sort(pix[offs[b] : offs[b + 1]]) for b in range(len(offs) - 1)] or [pix]), boxes


def _box_pixels(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    return np.sort((ys * W + xs).ravel())


def _supports(boxes: list[tuple[int, int, int, int]]):
    pix = [_box_pixels(*b) for b in boxes]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pix])]).astype(np.int64)
    return offsets, np.concatenate(pix).astype(np.int64), np.array(boxes, np.int64)


def test_jaccard_and_iou_hand_cases() -> None:
    a = np.array([0b1011, 0b0001], np.uint64)
    b = np.array([0b0011, 0b0010], np.uint64)
    assert jaccard(a, b) == pytest.approx(2 / 5)  # inter {0,1 | -} = 2, union {0,1,3 | 0,1} = 5
    assert jaccard(np.zeros(2, np.uint64), np.zeros(2, np.uint64)) == 0.0
    assert jaccard(a, a) == 1.0
    assert bbox_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert bbox_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert bbox_iou((0, 0, 3, 3), (4, 4, 5, 5)) == 0.0
    assert bbox_iou((2, 2, 2, 2), (2, 2, 2, 2)) == 1.0  # one pixel, inclusive


def test_two_blobs_two_objects_one_blob_one_object() -> None:
    feats = np.array([[0b111, 0b11]] * 3 + [[0b111000, 0b1000]] * 2, np.uint64)
    boxes = [(2, 2, 12, 12), (4, 3, 14, 13), (3, 5, 13, 15), (40, 30, 50, 40), (42, 31, 52, 41)]
    offsets, pixels, bboxes = _supports(boxes)
    cls = np.ones(5, np.int64)
    objs = group_instances(offsets, pixels, bboxes, cls, feats, 0.1)
    assert len(objs) == 2
    (c0, b0, a0), (c1, b1, a1) = objs
    assert (c0, b0) == (1, (2, 2, 14, 15)) and (c1, b1) == (1, (40, 30, 52, 41))
    assert a0 == len(np.unique(np.concatenate([_box_pixels(*b) for b in boxes[:3]])))
    assert a1 == len(np.unique(np.concatenate([_box_pixels(*b) for b in boxes[3:]])))
    # one blob: only the first three instances
    o3, p3, b3 = _supports(boxes[:3])
    assert len(group_instances(o3, p3, b3, cls[:3], feats[:3], 0.1)) == 1
    # same place, disjoint features: SMASH = 0, so no join
    feats2 = feats.copy()
    feats2[1] = np.array([0b1 << 20, 0], np.uint64)
    assert len(group_instances(o3, p3, b3, cls[:3], feats2[:3], 0.1)) == 2
    # different classes never join
    assert len(group_instances(o3, p3, b3, np.array([1, 2, 1]), feats[:3], 0.1)) == 2


def test_group_areas_over_many_steps_with_overlapping_groups() -> None:
    """Areas come from a per-pixel uint8 stamp map in the state, one stamp per group and step,
    cleared after 255 stamps: over 200 steps of two overlapping groups (two classes on the same
    pixels), each area is the number of distinct pixels of its members."""
    st = fresh_instance_state(48, W, InstanceParams())
    boxes = [(2, 2, 12, 12), (4, 3, 14, 13), (6, 5, 16, 15), (3, 4, 9, 20)]
    offsets, pixels, bboxes = _supports(boxes)
    feats = np.array([[0b111, 0b11]] * 4, np.uint64)
    cls = np.array([1, 2, 1, 2])
    expect = [len(np.unique(np.concatenate([_box_pixels(*boxes[i]) for i in members]))) for members in ((0, 2), (1, 3))]
    for step in range(200):  # 400 stamps: the map is cleared once
        objs = group_instances(offsets, pixels, bboxes, cls, feats, 0.1, st)
        assert [(c, a) for c, _b, a in objs] == [(1, expect[0]), (2, expect[1])], f"step {step}"
    assert 0 < st.seen_stamp[0] < 256


def test_smash_labels_equal_the_components_of_every_pair_s_score() -> None:
    """The grouping scores pairs lazily (a pair already in one component is skipped); its
    labels equal the connected components of the full same-class, SMASH >= tau graph built
    pair by pair here, labelled in order of first instance."""
    rng = np.random.default_rng(4)
    joins = splits = 0
    for _ in range(40):
        n = int(rng.integers(2, 30))
        ash = (rng.integers(0, 2**12, (n, 4)) & rng.integers(0, 2**12, (n, 4))).astype(np.uint64)
        xy = rng.integers(0, 60, (n, 2))
        wh = rng.integers(1, 25, (n, 2))
        bb = np.concatenate([xy, xy + wh], axis=1).astype(np.int64)
        cls = rng.integers(1, 3, n).astype(np.int64)
        tau = float(rng.choice([0.02, 0.1, 0.3]))
        adj = [[cls[i] == cls[j] and jaccard(ash[i], ash[j]) * bbox_iou(bb[i], bb[j]) >= tau for j in range(n)]
               for i in range(n)]
        expect = [-1] * n
        k = 0
        for i in range(n):  # components by depth-first search, numbered in order of first instance
            if expect[i] >= 0:
                continue
            todo = [i]
            expect[i] = k
            while todo:
                a = todo.pop()
                for b in range(n):
                    if adj[a][b] and expect[b] < 0:
                        expect[b] = k
                        todo.append(b)
            k += 1
        assert _smash_labels(ash, bb, cls, tau).tolist() == expect
        joins += k < n
        splits += k > 1
    assert joins >= 5 and splits >= 5  # both outcomes exercised


def test_stable_ids_while_moving_new_ids_never_reused_and_reset() -> None:
    p = InstanceParams()
    st = fresh_instance_state(48, W, p)
    seen = []
    for t in range(8):
        objs = [(1, (2 + 2 * t, 5, 12 + 2 * t, 15), 100), (1, (40, 30 - t, 50, 40 - t), 100)]
        if t >= 5:
            objs = objs[:1]  # the second object leaves
        if t == 7:
            objs.append((1, (40, 25, 50, 35), 100))  # a new one where the old one was, two steps later
        seen.append([i.id for i in track(objs, st, p.track_iou)])
    assert seen[:5] == [[1, 2]] * 5
    assert seen[5:7] == [[1], [1]]
    assert seen[7] == [1, 3]  # id 2 is not reused
    st2 = fresh_instance_state(48, W, p)
    assert [i.id for i in track([(1, (2, 5, 12, 15), 100)], st2, p.track_iou)] == [1]



def test_tracking_reuses_its_rows_and_notices_tracks_replaced_from_outside() -> None:
    """track_groups keeps the last step's rows for matching; tracks set from outside (a reset,
    the node's warm-up) must be matched as they are, not through those rows."""
    p = InstanceParams()
    st = fresh_instance_state(48, W, p)
    a, b = (1, (2, 5, 12, 15), 100), (1, (40, 30, 50, 40), 100)
    assert [i.id for i in track([a, b], st, p.track_iou)] == [1, 2]
    assert st.track_rows is not None and st.track_src is st.tracks
    assert [i.id for i in track([b, a], st, p.track_iou)] == [2, 1]  # matched through the kept rows
    st.tracks = [(7, 1, (2, 5, 12, 15))]  # replaced: the kept rows (b's, then a's) are stale
    assert [i.id for i in track([a], st, p.track_iou)] == [7]
    st.tracks = []
    assert [i.id for i in track([b], st, p.track_iou)] == [3]


def test_conv2_history_push_does_not_depend_on_spike_order() -> None:
    """The push ORs a position's run of spikes into one word: grouped, sorted and shuffled
    spike lists (a position seen again later) give the same history and position lists."""
    p = InstanceParams(ash_window=3)
    rng = np.random.default_rng(5)
    states = [fresh_instance_state(48, W, p) for _ in range(3)]
    for _ in range(5):  # more steps than slots: old slots are cleared and reused
        s2 = np.unique(rng.integers(0, 24 * 32 * 36, 400))
        for st, order in zip(states, (s2, s2[::-1], rng.permutation(s2))):
            record_conv2(st, order)
        ref = states[0]
        for st in states[1:]:
            assert np.array_equal(st.hist, ref.hist) and np.array_equal(st.n_written, ref.n_written)
            for k in range(3):
                n = int(ref.n_written[k])
                assert sorted(st.written[k, :n]) == sorted(ref.written[k, :n])

def test_ash_uses_conv2_history_in_support() -> None:
    p = InstanceParams(ash_window=3)
    st = fresh_instance_state(48, W, p)
    # feature 5 at Conv2 position (y=3, x=4) -> pixels (6..7, 8..9); feature 7 far away
    s2 = np.array([(3 * (W // 2) + 4) * 36 + 5, (20 * (W // 2) + 30) * 36 + 7], np.int64)
    supports = _supports([(8, 6, 9, 7), (8, 6, 9, 7)])
    objs, st = instances_step(supports, np.array([1, 1]), s2, W, st, p)
    assert len(objs) == 1 and objs[0].area == 4
    from model.instances import _ash

    ash = _ash(supports[0], supports[1], W, st.h2, st.w2, st.hist, st.slot, np.full(st.h2 * st.w2, -1, np.int64), 0)
    assert ash[0, 0] == np.uint64(1 << 5) and ash[0, 1] == 0
    assert ash[1, 0] == np.uint64(1 << 5)  # the second instance reads the same cell again (its own stamp)


def _model_and_steps(n_steps: int, gap: int = 60):
    cfg = build(ModelConfig, {})
    enc = Encoder(cfg, 2)
    sp = SparseSpikeSEG.from_encoder(enc)
    h, w = 64, 128
    frames = []
    for t in range(n_steps):
        f = np.zeros((2, h, w), np.float32)
        for x0, y0 in ((6 + t, 16), (6 + gap + t, 30)):
            f[1, y0 : y0 + 18, x0 : x0 + 2] = 1
            f[0, y0 : y0 + 18, x0 + 14 : x0 + 16] = 1
            f[1, y0 : y0 + 2, x0 : x0 + 16] = 1
        frames.append(f)
    return cfg, enc, sp, frames


def test_batched_onehot_decode_equals_per_spike_decode_and_sparse() -> None:
    # 4 steps: the first has no S3 spike, the next three ~260-285 each (the dense batch of one
    # step's one-hot maps costs ~4 s here, so more steps add time, not coverage)
    cfg, enc, sp, frames = _model_and_steps(4)
    st = dst = None
    checked = 0
    for f in frames:
        out, st = sp.step(f, st)
        dout, dst = enc.step(enc.prepare_input(torch.from_numpy(f)), dst)
        if not len(out.s3):
            continue
        (offs, pix, boxes), cls, skipped = dense_spike_supports(dout, enc.w1, enc.w2, enc.w3, True, 0.0, cap=4096)
        assert skipped == 0 and len(cls) == len(out.s3)
        # one at a time through the same dense decoder
        oh, flat = onehot_spikes(dout.classification_spikes)
        assert np.array_equal(flat.numpy(), out.s3)
        for b in range(0, len(flat), max(1, len(flat) // 7)):
            one = dout._replace(classification_spikes=oh[b : b + 1])
            sal = decode_saliency(one, enc.w1, enc.w2, enc.w3, True)[0, 0]
            single = np.nonzero((sal > 0).reshape(-1).numpy())[0]
            assert np.array_equal(single, pix[offs[b] : offs[b + 1]])
        # the sparse path's per-spike supports are the same sets
        s_offs, s_pix, s_boxes = sp.spike_supports(st, out.s3)
        assert np.array_equal(s_offs, offs) and np.array_equal(s_boxes, boxes)
        assert all(np.array_equal(np.sort(s_pix[offs[b] : offs[b + 1]]), pix[offs[b] : offs[b + 1]]) for b in range(len(boxes)))
        checked += 1
    assert checked >= 3


def test_end_to_end_two_moving_objects_keep_ids_and_reset() -> None:
    cfg, enc, sp, frames = _model_and_steps(14)
    p = InstanceParams()
    st = ist = None
    tracks: dict[int, list[int]] = {}
    for t, f in enumerate(frames):
        out, st = sp.step(f, st)
        objs, ist = sparse_instances(sp, st, out, ist, p)
        big = sorted(objs, key=lambda o: -o.area)[:2]
        if t >= 4:
            assert len(big) == 2 and bbox_iou(big[0].bbox, big[1].bbox) == 0.0
            for o in big:
                tracks.setdefault(o.bbox[0] < 64, []).append(o.id)
        for o in objs:  # every object lies on lit mask pixels
            x0, y0, x1, y1 = o.bbox
            assert out.mask[y0 : y1 + 1, x0 : x1 + 1].any()
    assert all(len(set(ids)) == 1 for ids in tracks.values()), tracks
    assert len(tracks) == 2
    # reset: fresh states restart ids at 1
    st, ist = None, None
    out, st = sp.step(frames[-1], st)
    objs, ist = sparse_instances(sp, st, out, ist, p)
    assert min(o.id for o in objs) == 1


@pytest.mark.parametrize("cap", [64, 3])
def test_fused_hulk_call_equals_the_step_by_step_calls(cap: int) -> None:
    """sparse_hulk (supports + history + ASH + grouping in one compiled call) == sparse_instances:
    the same objects and ids every step, the same history, tracks and skipped count."""
    _cfg, _enc, sp, frames = _model_and_steps(14)
    p = InstanceParams(max_spikes=cap)
    st = ia = ib = None
    n_objs = 0
    for f in frames:
        out, st = sp.step(f, st)
        spikes, skipped = select_spikes(out.s3, cap)
        a, ia = sparse_instances(sp, st, out, ia, p)
        b, ib = sparse_hulk(sp, st, out, ib, p, spikes, skipped)
        assert a == b
        n_objs += len(a)
        assert np.array_equal(ia.hist, ib.hist) and ia.slot == ib.slot and ia.tracks == ib.tracks
        assert (ia.next_id, ia.skipped_spikes, ia.qstamp) == (ib.next_id, ib.skipped_spikes, ib.qstamp)
    assert n_objs > 10


def test_spike_cap_and_params_validation() -> None:
    s = np.arange(100, dtype=np.int64)
    sel, skipped = select_spikes(s, 64)
    assert len(sel) == 64 and skipped == 36 and sel[0] == 0 and sel[-1] == 99
    assert select_spikes(s[:10], 64)[1] == 0
    with pytest.raises(ValueError, match="smash_tau"):
        InstanceParams(smash_tau=0.0)
    with pytest.raises(ValueError, match="ash_window"):
        InstanceParams(ash_window=0)


@pytest.mark.parametrize("over,hw", [({}, (64, 128)), ({"decoder_gate": False, "n_classes": 2, "theta3": 20.0}, (37, 53))])
def test_cropped_supports_equal_full_frame_and_sparse(over: dict, hw: tuple[int, int]) -> None:
    """crop_spike_supports (dense path, 40x40 crops) == full-frame one-hot decode == sparse kernels,
    with arbitrary (then quantized) weights, odd sizes, gate on/off, two classes."""
    from model.encoder import quantize_weights
    from model.instances import crop_spike_supports

    cfg = build(ModelConfig, over)
    enc = Encoder(cfg, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        enc.w2.copy_(quantize_weights(torch.rand(enc.w2.shape, generator=g) * 0.6 + 0.4))
        enc.w3.copy_(quantize_weights(torch.rand(enc.w3.shape, generator=g)))
    sp = SparseSpikeSEG.from_encoder(enc)
    rng = np.random.default_rng(0)
    h, w = hw
    st = dst = None
    n = steps_checked = 0
    for t in range(6):  # Conv3 fires from the second step on (first: 6 spikes, or none); ~1.5 s per step
        f = (rng.random((2, h, w)) < 0.08).astype(np.float32)
        out, st = sp.step(f, st)
        dout, dst = enc.step(enc.prepare_input(torch.from_numpy(f)), dst)
        if not len(out.s3):
            continue
        # cap 96: the full-frame reference decodes one H x W map per spike, and the calibrated
        # defaults (lambda1 1.6) fire hundreds of S3 spikes per step on this input
        a, ca, _ = crop_spike_supports(dout, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, 0.0, 96)
        b, cb, _ = dense_spike_supports(dout, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, 0.0, 96)
        s = _canon(sp.spike_supports(st, select_spikes(out.s3, 96)[0]))
        for x, y, z in zip(a, b, s):
            assert np.array_equal(x, y) and np.array_equal(x, z), f"step {t}"
        assert np.array_equal(ca, cb)
        n += len(ca)
        steps_checked += 1
        # the cap keeps the same evenly spaced subset on both dense producers
        a8, c8, sk8 = crop_spike_supports(dout, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, 0.0, 8)
        b8, d8, sk8b = dense_spike_supports(dout, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, 0.0, 8)
        assert sk8 == sk8b and np.array_equal(c8, d8) and all(np.array_equal(x, y) for x, y in zip(a8, b8))
    assert n > 100 and steps_checked >= 4
