"""Metric functions on hand-built cases with known answers (perfect, empty, half-overlap, all-background)."""
from __future__ import annotations

import numpy as np
import pytest

from sinks import scoring
from sinks.scoring import Confusion, Detections
from stream.events import SensorSize, make_events

SIZE = SensorSize(32, 16)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """8 events: 4 of object 1 in the 2x2 block at (4..5, 4..5), 4 background spread out."""
    x = [4, 5, 4, 5, 20, 25, 30, 10]
    y = [4, 4, 5, 5, 1, 10, 15, 12]
    lab = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=np.int16)
    return make_events(range(8), x, y, [1] * 8), lab


def _mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((SIZE.height, SIZE.width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0 : y1 + 1, x0 : x1 + 1] = 1
    return m


def test_confusion_ratios_and_undefined() -> None:
    c = Confusion(tp=3, fp=1, fn=2, tn=4)
    assert c.precision == pytest.approx(0.75)
    assert c.recall == pytest.approx(0.6)
    assert c.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert c.iou == pytest.approx(0.5)
    assert c.specificity == pytest.approx(0.8)
    assert c.bg_marked == pytest.approx(0.2)
    assert c.informedness == pytest.approx(0.4)
    empty = Confusion()
    assert empty.precision is None and empty.recall is None and empty.iou is None and empty.informedness is None
    assert (c + c).as_dict()["tp"] == 6


def test_event_perfect() -> None:
    ev, lab = _scene()
    c = scoring.event_confusion(ev, lab, _mask((4, 4, 5, 5)))
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 0, 0, 4)
    assert c.iou == 1.0 and c.f1 == 1.0 and c.bg_marked == 0.0


def test_event_empty_mask() -> None:
    ev, lab = _scene()
    c = scoring.event_confusion(ev, lab, _mask())
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 0, 4, 4)
    assert c.precision is None and c.recall == 0.0 and c.iou == 0.0 and c.f1 == 0.0


def test_event_half_overlap() -> None:
    ev, lab = _scene()
    # covers the left column of the object (2 events) and the background event at (10, 12)
    c = scoring.event_confusion(ev, lab, _mask((4, 4, 4, 5), (10, 12, 10, 12)))
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 2, 3)
    assert c.iou == pytest.approx(2 / 5)
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(0.5)


def test_event_all_background() -> None:
    ev, _ = _scene()
    lab = np.zeros(len(ev), dtype=np.int16)
    c = scoring.event_confusion(ev, lab, _mask((0, 0, 31, 15)))
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 8, 0, 0)
    assert c.recall is None and c.iou == 0.0 and c.bg_marked == 1.0
    assert scoring.event_confusion(ev, lab, _mask()).bg_marked == 0.0


def test_unlabelled_events_are_skipped() -> None:
    ev, lab = _scene()
    lab = lab.copy()
    lab[:2] = -1
    c = scoring.event_confusion(ev, lab, _mask((4, 4, 5, 5)))
    assert c.n == 6 and c.tp == 2


def test_event_outside_mask_is_loud() -> None:
    ev = make_events([0], [40], [0], [1])
    with pytest.raises(ValueError, match="outside"):
        scoring.event_prediction(ev, _mask())


def test_pixel_iou_counts_event_pixels_once() -> None:
    ev, lab = _scene()
    ev = np.concatenate([ev, ev[:1]])  # a second event on an object pixel
    lab = np.concatenate([lab, lab[:1]])
    c = scoring.pixel_confusion(ev, lab, _mask((4, 4, 4, 5), (0, 0, 31, 0)))
    # object pixels 4, two masked; the mask row y=0 holds no events and is not scored
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 0, 2, 4)
    assert c.iou == pytest.approx(0.5)


def test_volume_cells_informedness() -> None:
    ev, lab = _scene()
    pred = scoring.event_prediction(ev, _mask((4, 4, 5, 5)))
    has, pos, prd = scoring.volume_cells(ev, lab, pred, SIZE, cell_px=8)
    assert has.shape == (2, 4)
    # object block in cell (0,0); background in cells (0,2), (1,3), (1,3), (1,1)
    assert int(has.sum()) == 4 and int(pos.sum()) == 1 and int(prd.sum()) == 1
    c = scoring.volume_confusion(has, pos, prd)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 0, 0, 3) and c.informedness == 1.0
    # "everything is object" and "nothing is object" both score J = 0 (empty cells not counted)
    everything = scoring.volume_confusion(has, pos, has)
    nothing = scoring.volume_confusion(has, pos, np.zeros_like(has))
    assert everything.informedness == 0.0 and nothing.informedness == 0.0


def test_box_iou_and_matching() -> None:
    assert scoring.box_iou((0, 0, 3, 3), (0, 0, 3, 3)) == 1.0
    assert scoring.box_iou((0, 0, 3, 3), (0, 0, 1, 3)) == pytest.approx(0.5)
    assert scoring.box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
    truth = [(0, 0, 3, 3), (10, 10, 13, 13)]
    d = scoring.match_detections([(0, 0, 3, 3), (10, 10, 11, 13), (20, 0, 22, 2)], truth)
    assert d == Detections(tp=2, fp=1, fn=0)
    # below 0.5 does not match; a prediction on an ignored object is not an FP
    d = scoring.match_detections([(0, 0, 0, 3), (20, 0, 22, 2)], truth, ignored=[(20, 0, 22, 2)])
    assert d == Detections(tp=0, fp=1, fn=2)
    assert d.precision == 0.0 and d.recall == 0.0
    assert scoring.match_detections([], []).precision is None


def test_true_boxes_ignores_small_objects() -> None:
    ev, lab = _scene()
    lab = lab.copy()
    lab[4] = 2  # object 2 has one event
    kept, ignored = scoring.true_boxes(ev, lab, min_events=3)
    assert kept == [(4, 4, 5, 5)] and ignored == [(20, 1, 20, 1)]


def test_density_filter_marks_clusters_not_isolated_noise() -> None:
    ev, _ = _scene()
    m = scoring.density_filter_mask(ev, SIZE, radius=2, min_count=4)
    assert m.shape == (SIZE.height, SIZE.width) and m.dtype == np.uint8
    # every pixel within 2 px of the whole 2x2 block sees all 4 block events
    assert m[4, 4] == 1 and m[3, 3] == 1 and m[6, 6] == 1 and m[2, 3] == 0 and m[7, 7] == 0
    # x=6 still sees both columns (4 events); x=7 sees only column x=5 (2 events)
    assert m[4, 6] == 1 and m[4, 7] == 0
    assert m[1, 20] == 0 and m[10, 25] == 0 and m[15, 30] == 0
    # brute force check of the integral image on random events
    rng = np.random.default_rng(0)
    ev2 = make_events(np.arange(300), rng.integers(0, 32, 300), rng.integers(0, 16, 300), np.ones(300))
    cnt = np.zeros((16, 32), int)
    np.add.at(cnt, (ev2["y"].astype(int), ev2["x"].astype(int)), 1)
    pad = np.pad(cnt, 2)
    brute = np.array([[pad[y : y + 5, x : x + 5].sum() >= 4 for x in range(32)] for y in range(16)])
    assert np.array_equal(scoring.density_filter_mask(ev2, SIZE) > 0, brute)


def test_density_filter_does_not_mutate_and_handles_empty() -> None:
    ev, _ = _scene()
    before = ev.copy()
    scoring.density_filter_mask(ev, SIZE)
    assert np.array_equal(ev, before)
    assert scoring.density_filter_mask(make_events([], [], [], []), SIZE).sum() == 0


def test_mask_boxes() -> None:
    boxes = scoring.mask_boxes(_mask((1, 1, 3, 2), (10, 10, 10, 10)), min_area=2)
    assert boxes == [(1, 1, 3, 2)]


def test_window_activity() -> None:
    t0 = np.arange(0, 100, 10)
    t1 = t0 + 10
    windows = np.array([[0, 30], [60, 95]])
    active = np.array([1, 1, 0, 0, 0, 0, 1, 1, 1, 1], bool)
    r = scoring.window_activity(t0, t1, active, windows)
    # inside: steps 0,1,2 (0-30) and 6,7,8 (60-90); gap: 3,4,5; boundary: 9 (90-100)
    assert r["steps_inside"] == 6 and r["steps_gap"] == 3 and r["steps_boundary"] == 1
    assert r["active_inside"] == pytest.approx(5 / 6) and r["active_gap"] == 0.0
