"""Short layer-wise STDP training on a small synthetic scene: C_l falls, features move, resume continues."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

import model.train as train  # registers the 'train' section
from model.checkpoint import read_checkpoint
from model.encoder import init_learned_weights

# Small and busy: 64x64 shapes scene, 5 ms bins (enough Conv2 activity to learn from in seconds).
SMALL = {
    "binner": {"bin_us": 5000},
    "synthetic": {"scene": "shapes", "n_objects": 6, "duration_s": 2.0, "width": 64, "height": 64},
    "model": {"instances": False},
    "train": {"crop": 64, "samples_per_epoch": 16, "batch": 8, "scenes": 2, "window_steps": 6,
              "window_gap": 0, "min_events": 100, "val_scenes": ["shapes", "shapes:1.0"], "val_duration_s": 0.1},
}


def _args(tmp: Path, *extra: str) -> argparse.Namespace:
    cfg = tmp / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    return p.parse_args(["-c", str(cfg), "-o", str(tmp / "runs"), "--no-progress", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    assert train.main(_args(tmp, "-n", "a", "--epochs", "16")) == 0
    return tmp


def test_training_lowers_c_l_and_moves_features(first_run: Path) -> None:
    run = first_run / "runs" / "a"
    m = json.loads((run / "metrics_final.json").read_text())
    c2 = m["layers"]["conv2"]
    w2_init, w3_init = init_learned_weights(1, 42)
    c_init = train.convergence(w2_init).item()  # ~0.16 at N(0.8, 0.01)
    # LTD first drags weights from 0.8 through 0.5 (C_l rises), then they polarise (C_l falls)
    assert max(c2["c_l_curve"]) > c_init and c2["c_l_curve"][-1] < c_init - 0.02
    assert c2["c_l"] == pytest.approx(c2["c_l_curve"][-1])
    assert sum(c2["wins_per_map"]) > 0
    ck = read_checkpoint(run / "checkpoints" / "checkpoint_latest.pt")
    assert (ck.w2 - w2_init).abs().max().item() > 0.05  # features moved away from N(0.8, 0.01)
    assert (ck.w3 - w3_init).abs().max().item() > 0.01
    assert 0.0 <= ck.w2.min().item() and ck.w2.max().item() <= 1.0
    assert ck.metadata["trained"] is True and ck.metadata["seed"] == 42
    for name in ("checkpoint_epoch1_conv2.pt", "checkpoint_best.pt", "checkpoint_latest.pt"):
        assert (run / "checkpoints" / name).is_file()
    # selection by validation score: the init is scored first, best = the highest score seen
    assert (run / "checkpoints" / "checkpoint_epoch0_init.pt").is_file()
    scores = [m["val_init"]["score"]] + c2["val_curve"] + m["layers"]["conv3"]["val_curve"]
    assert len(scores) == 1 + len(c2["c_l_curve"]) + len(m["layers"]["conv3"]["c_l_curve"])
    assert all(0.0 <= v <= 1.0 for v in scores)
    assert m["best"]["val"]["score"] == max(scores)
    assert m["best"]["epoch"] == scores.index(max(scores))
    best = read_checkpoint(run / "checkpoints" / "checkpoint_best.pt")
    assert best.metadata["train_state"]["best"]["epoch"] == m["best"]["epoch"]
    for png in ("features_conv2.png", "features_conv3.png", "weights_hist.png", "raster_sample.png", "convergence.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert list((run / "logs").glob("train_*.log"))


def test_resume_continues_epoch_count(first_run: Path) -> None:
    ck = first_run / "runs" / "a" / "checkpoints" / "checkpoint_epoch2_conv2.pt"
    assert train.main(_args(first_run, "-n", "b", "--epochs", "3", "-r", str(ck))) == 0
    run = first_run / "runs" / "b"
    m = json.loads((run / "metrics_final.json").read_text())
    hist = read_checkpoint(run / "checkpoints" / "checkpoint_latest.pt").metadata["train_state"]["history"]
    # epochs 1-2 came from the checkpoint, 3 finished conv2, 4.. trained conv3
    assert [h["epoch"] for h in hist["conv2"]][:3] == [1, 2, 3]
    assert hist["conv3"][0]["epoch"] == 4
    assert m["epochs_total"] == 3 + len(hist["conv3"])
    assert (run / "checkpoints" / "checkpoint_epoch3_conv2.pt").is_file()
    assert not (run / "checkpoints" / "checkpoint_epoch1_conv2.pt").exists()


def test_bad_config_and_resume_are_usage_errors(tmp_path: Path) -> None:
    from stream.config import build
    from stream.node import UsageError

    with pytest.raises(UsageError, match="held out"):
        build(train.TrainConfig, {"scene_seed0": 995, "scenes": 10})
    with pytest.raises(UsageError, match="layers"):
        build(train.TrainConfig, {"layers": ["conv1"]})
    with pytest.raises(UsageError, match="benchmark"):
        build(train.TrainConfig, {"val_seed0": 998})  # validation seeds would reach the held-out ones
    with pytest.raises(UsageError, match="val_scenes"):
        build(train.TrainConfig, {"val_scenes": ["shapes:lots"]})
    with pytest.raises(UsageError, match="no checkpoint"):
        train.main(_args(tmp_path, "-r", str(tmp_path / "missing.pt")))


def test_trace_layer_marks_first_spikes() -> None:
    from model.config import ModelConfig
    from model.encoder import Encoder

    enc = Encoder(ModelConfig(), 2)
    frames = torch.zeros(4, 1, 2, 32, 32)
    frames[1:, :, :, 8:24, 12] = 1  # a vertical edge from step 1 on
    tr = train.trace_layer(enc, frames, "conv2")
    fired = torch.isfinite(tr.pre_times)
    assert fired.any() and tr.pre_times[fired].min().item() >= 1.0
    post = torch.isfinite(tr.post_times)
    assert torch.equal(post.sum((2, 3)) > 0, tr.spikes > 0)
    assert (tr.post_membrane[post] >= 10.0).all()  # pre-reset membrane at a spike is >= theta
