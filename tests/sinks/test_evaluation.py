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
    # the density baseline is judged on the same windows: the square is dense, so it is on in every step
    wb = r["windows_baseline"]
    assert wb["steps_inside"] == 2 and wb["active_inside"] == 1.0 and wb["active_gap"] == 1.0


def test_eval_config_validates() -> None:
    with pytest.raises(UsageError, match="cell_px"):
        build(EvalConfig, {"cell_px": 0})
    with pytest.raises(UsageError, match="unknown config key"):
        build(EvalConfig, {"cell": 8})


# --------------------------------------------------------------------------- end to end (real engine, model)

TINY = """
synthetic: {{width: 64, height: 48, duration_s: {dur}, scene: {scene}, seed: 1000, noise_hz: 0.5}}
engine: {{runs_dir: "{runs}", status_s: 0, device: cpu}}
model: {{instances: false}}
eval: {{strip_frames: 3}}
"""


def _args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    base = dict(source=None, weights=None, config=None, preset=None, device=None, json=None, png=None,
                benchmark=False, sweep=False, duration=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _tiny_config(tmp_path: Path, dur: float = 0.06, scene: str = "shapes") -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(dur=dur, scene=scene, runs=tmp_path / "runs"))
    return p


def _all_metrics(s: dict) -> None:
    for method in ("model", "baseline"):
        m = s[method]
        for block in ("event", "pixel", "volume"):
            assert set(m[block]) >= {"tp", "fp", "fn", "tn", "precision", "recall", "f1", "iou", "informedness", "bg_marked"}
        assert set(m["detection"]) >= {"tp", "fp", "fn", "precision", "recall"}
        assert "pixel_iou_mean" in m and "mask_nonempty" in m


@pytest.mark.slow
def test_eval_tiny_synthetic_scene_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfgp = _tiny_config(tmp_path)
    out_json, out_png = tmp_path / "e.json", tmp_path / "e.png"
    assert E.main(_args(tmp_path, source="synthetic", config=str(cfgp), json=str(out_json), png=str(out_png))) == 0
    rep = json.loads(out_json.read_text())
    assert rep["format"] == E.EVAL_FORMAT and list(rep["scenes"]) == ["synthetic"]
    s = rep["scenes"]["synthetic"]
    assert s["steps"] >= 55 and s["object_events"] > 0 and s["labelled_events"] == s["events"]
    _all_metrics(s)
    _all_metrics(rep["overall"])
    assert rep["targets"]["event_iou"]["min"] == 0.80
    # the event confusion covers exactly the labelled events, for both methods
    for method in ("model", "baseline"):
        ev = s[method]["event"]
        assert ev["tp"] + ev["fp"] + ev["fn"] + ev["tn"] == s["labelled_events"]
    assert out_png.stat().st_size > 10_000
    assert "| synthetic | model |" in capsys.readouterr().out


def _dv_write(path: Path, ev: np.ndarray, size: SensorSize) -> None:
    import dv_processing as dv

    writer = dv.io.MonoCameraWriter(str(path), dv.io.MonoCameraWriter.EventOnlyConfig("test", (size.width, size.height)))
    store = dv.EventStore()
    for e in ev:
        store.push_back(int(e["timestamp"]), int(e["x"]), int(e["y"]), bool(e["polarity"]))
    writer.writeEvents(store)
    del writer


@pytest.mark.slow
def test_eval_labelled_recording_matches_the_synthetic_truth(tmp_path: Path) -> None:
    """A recording + rec.labels.npz scores exactly as the synthetic scene it was written from."""
    from sources import labels as L
    from sources.synthetic import SyntheticConfig, SyntheticSource

    cfgp = _tiny_config(tmp_path, dur=0.05)
    sc = build(SyntheticConfig, {"width": 64, "height": 48, "duration_s": 0.05, "scene": "shapes", "seed": 1000,
                                 "noise_hz": 0.5})
    src = SyntheticSource(sc)
    src.open(RunContext(stop=threading.Event(), metrics=None))
    pk = [p for p in src.packets() if len(p)]
    ev = np.concatenate([p.events for p in pk])
    lab = np.concatenate([p.labels for p in pk])
    rec = tmp_path / "rec.aedat4"
    _dv_write(rec, ev, src.size)
    L.save_event_labels(L.labels_path(rec), ev, lab)
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    assert E.main(_args(tmp_path, source=str(rec), config=str(cfgp), json=str(a), png=str(tmp_path / "a.png"))) == 0
    assert E.main(_args(tmp_path, source="synthetic", config=str(cfgp), json=str(b), png=str(tmp_path / "b.png"))) == 0
    ra, rb = json.loads(a.read_text())["scenes"]["rec"], json.loads(b.read_text())["scenes"]["synthetic"]
    assert ra["unlabelled_events"] == 0 and ra["labelled_events"] == len(ev)
    for method in ("model", "baseline"):
        assert ra[method]["event"] == rb[method]["event"]
        assert ra[method]["volume"] == rb[method]["volume"]


def test_eval_refuses_a_recording_without_ground_truth(tmp_path: Path) -> None:
    rec = tmp_path / "plain.aedat4"
    _dv_write(rec, make_events([1, 2], [1, 2], [1, 2], [1, 1]), SensorSize(16, 16))
    with pytest.raises(UsageError, match="no ground truth"):
        E.main(_args(tmp_path, source=str(rec), config=str(_tiny_config(tmp_path))))
    with pytest.raises(UsageError, match="cannot be combined"):
        E.main(_args(tmp_path, source="synthetic", sweep=True, config=str(_tiny_config(tmp_path))))


@pytest.mark.slow
def test_sweep_writes_a_table(tmp_path: Path) -> None:
    from stream.config import load_config

    cfg = load_config(_tiny_config(tmp_path, dur=0.03))
    scenes = [E.source_scene("synthetic", cfg)]
    res = E.sweep(cfg, scenes, weights=None, duration_s=None, out_dir=tmp_path / "sw",
                  knobs={"mask_window": [1, cfg["model"].mask_window]})
    assert [r["value"] for r in res["rows"]] == [1, cfg["model"].mask_window]
    assert res["best"]["mask_window"] in (1, cfg["model"].mask_window) and [r["default"] for r in res["rows"]] == [False, True]
    assert all(r["informedness"] is None or -1 <= r["informedness"] <= 1 for r in res["rows"])
    md = E.sweep_markdown(res)
    assert md.count("| mask_window |") == 2 and "default" in md


def test_sweep_knobs_and_defaults() -> None:
    """The sweep covers the calibration knobs incl. the bin length; unknown knobs fail before any run."""
    from stream.config import load_config

    cfg = load_config(None, None, {"model": {"instances": False}})
    vals = E.sweep_values(cfg)
    for k in ("lambda1", "theta1", "lambda2", "theta2", "theta3", "decoder_gate", "decoder_threshold",
              "mask_window", "mask_window_mode", "binner.bin_us"):
        assert k in vals and E.knob_value(cfg, k) in vals[k], k
    assert {1000, 2000, 5000} <= set(vals["binner.bin_us"]) and {1, 3, 5, 10} <= set(vals["mask_window"])
    with pytest.raises(UsageError, match="not a config key"):
        E.sweep(cfg, [], weights=None, duration_s=0.1, out_dir=Path("/nonexistent"), knobs={"binner.nope": [1]})
