"""The eval sink and ``run.py eval``: scores on hand-built steps, and real pipelines end to end."""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from sinks import evaluation as E
from sinks.evaluation import EvalConfig, EvalSink
from stream.config import build
from stream.events import EventPacket, Instance, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.node import RunContext, SourceNode, UsageError

SIZE = SensorSize(48, 32)


def _square_events(t0: int, x0: int, y0: int, side: int, noise: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The outline of a side x side square at (x0, y0) (object 1) plus ``noise`` random background events."""
    xs, ys = [], []
    for i in range(side):
        xs += [x0 + i, x0 + i, x0, x0 + side - 1]
        ys += [y0, y0 + side - 1, y0 + i, y0 + i]
    nx = rng.integers(0, SIZE.width, noise).tolist()
    ny = rng.integers(0, SIZE.height, noise).tolist()
    n = len(xs) + noise
    t = np.sort(rng.integers(t0, t0 + 1000, n))
    ev = make_events(t, xs + nx, ys + ny, rng.integers(0, 2, n))
    lab = np.array([1] * len(xs) + [0] * noise, dtype=np.int16)
    order = np.argsort(ev["timestamp"], kind="stable")
    return ev[order], lab[order]


def _result(index: int, ev: np.ndarray, lab: np.ndarray | None, mask: np.ndarray, inst: list[Instance] | None = None) -> MaskResult:
    step = Step(index, index * 1000, index * 1000 + 1000, None, ev, SIZE, 0, lab)
    return MaskResult(step, mask, inst or [])


def test_sink_scores_a_perfect_mask_and_its_baseline() -> None:
    rng = np.random.default_rng(0)
    sink = EvalSink(build(EvalConfig, {"strip_frames": 2}))
    for k in range(4):
        ev, lab = _square_events(k * 1000, 10 + k, 8, 8, 6, rng)
        mask = np.zeros((SIZE.height, SIZE.width), np.uint8)
        obj = lab > 0
        mask[ev["y"][obj], ev["x"][obj]] = 1
        sink.process(_result(k, ev, lab, mask, [Instance(1, 1, (10 + k, 8, 17 + k, 15), 28)]))
    sink.process(StreamReset("test"))
    r = sink.result()
    m = r["model"]
    assert r["scored_steps"] == 4 and r["object_events"] == 4 * 32
    assert m["event"]["iou"] == 1.0 and m["event"]["bg_marked"] == 0.0
    assert m["volume"]["informedness"] == 1.0 and m["pixel_iou_mean"] == 1.0
    assert m["detection"]["tp"] == 4 and m["detection"]["fp"] == 0 and r["model_detection_from"] == "instances"
    # the density baseline marks the dense outline, and far from all of the isolated noise
    b = r["baseline"]
    assert b["event"]["recall"] > 0.9 and b["event"]["bg_marked"] < 0.5
    assert len(sink.frames()) == 2


def test_sink_empty_mask_and_unlabelled_steps() -> None:
    rng = np.random.default_rng(1)
    sink = EvalSink(EvalConfig(), windows=np.array([[0, 2000]]))
    ev, lab = _square_events(0, 5, 5, 6, 4, rng)
    empty = np.zeros((SIZE.height, SIZE.width), np.uint8)
    sink.process(_result(0, ev, lab, empty))
    sink.process(_result(1, ev, None, empty))  # no ground truth: activity only
    sink.process(_result(2, ev, None, empty + 1))
    r = sink.result()
    assert r["steps"] == 3 and r["scored_steps"] == 1
    assert r["model"]["event"]["recall"] == 0.0 and r["model"]["event"]["precision"] is None
    assert r["model"]["volume"]["informedness"] == 0.0
    assert r["windows"]["steps_inside"] == 2 and r["windows"]["active_inside"] == 0.0
    assert r["windows"]["steps_gap"] == 1 and r["windows"]["active_gap"] == 1.0


def test_eval_config_validates() -> None:
    with pytest.raises(UsageError, match="cell_px"):
        build(EvalConfig, {"cell_px": 0})
    with pytest.raises(UsageError, match="unknown config key"):
        build(EvalConfig, {"cell": 8})
