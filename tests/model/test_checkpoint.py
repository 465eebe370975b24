"""Checkpoints: round trip, shipped default, strict safe loading, clear mismatch errors."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import (
    DEFAULT_WEIGHTS,
    INIT_WEIGHTS,
    FORMAT,
    load_into,
    make_init_weights,
    read_checkpoint,
    save_checkpoint,
)
from model.config import ModelConfig
from model.encoder import Encoder
from stream.config import build
from stream.node import NodeError, UsageError




MARKER_ENV = "SPIKESTREAM_TEST_MARKER"


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _cfg(**kw) -> ModelConfig:
    return build(ModelConfig, kw)


def test_round_trip_keeps_weights_thresholds_config_and_metadata(tmp_path: Path) -> None:
    enc = Encoder(_cfg(seed=7, n_classes=2), 2)
    with torch.no_grad():
        enc.theta2.fill_(3.5)
    p = tmp_path / "a.pt"
    save_checkpoint(p, enc, {"trained": True, "epochs": 3})
    ck = read_checkpoint(p)
    assert ck.metadata == {"trained": True, "epochs": 3}
    assert ck.config["seed"] == 7 and ck.config["n_classes"] == 2
    other = Encoder(_cfg(seed=8, n_classes=2), 2)
    load_into(other, p)
    assert torch.equal(other.w2, enc.w2) and torch.equal(other.w3, enc.w3)
    assert torch.equal(other.theta2, enc.theta2)  # trained checkpoint: its thresholds win
    raw = torch.load(p, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT


def test_trained_thresholds_are_an_adaptation_kept_under_a_theta_override(tmp_path: Path) -> None:
    """A trained checkpoint carries thresholds relative to its own config: loaded with that
    config they come back exactly; a preset or ``theta*`` override is applied with the
    per-channel adaptation kept; thresholds equal to its config's leave the override alone."""
    enc = Encoder(_cfg(), 2)
    with torch.no_grad():
        enc.theta2.fill_(10.0)
        enc.theta2[3] = 13.0  # homeostasis raised one channel by 30 %
    p = tmp_path / "adapted.pt"
    save_checkpoint(p, enc, {"trained": True})
    same = Encoder(_cfg(), 2)
    load_into(same, p)
    assert torch.equal(same.theta2, enc.theta2)
    over = Encoder(_cfg(theta2=20.0), 2)
    load_into(over, p)
    assert float(over.theta2[3]) == 26.0 and float(over.theta2[0]) == 20.0
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, Encoder(_cfg(), 2), {"trained": True})  # thresholds = its config's
    over = Encoder(_cfg(theta1=7.0, theta2=20.0), 2)
    load_into(over, plain)
    assert float(over.theta1.min()) == float(over.theta1.max()) == 7.0
    assert float(over.theta2.min()) == float(over.theta2.max()) == 20.0
    # a threshold that float32 cannot hold exactly (0.1) still round-trips bit for bit
    small = Encoder(_cfg(theta3=0.1), 2)
    with torch.no_grad():
        small.theta3.fill_(0.1)
    save_checkpoint(tmp_path / "small.pt", small, {"trained": True})
    again = Encoder(_cfg(theta3=0.1), 2)
    load_into(again, tmp_path / "small.pt")
    assert torch.equal(again.theta3, small.theta3)


def test_untrained_checkpoint_keeps_config_thresholds(tmp_path: Path) -> None:
    p = tmp_path / "u.pt"
    save_checkpoint(p, Encoder(_cfg(), 2), {"trained": False})
    enc = Encoder(_cfg(theta1=7.0), 2)
    load_into(enc, p)
    assert float(enc.theta1.max()) == 7.0


def test_shipped_init_is_paper_init_and_small(tmp_path: Path) -> None:
    assert INIT_WEIGHTS.is_file() and INIT_WEIGHTS.stat().st_size < 100_000
    ck = read_checkpoint(INIT_WEIGHTS)
    assert ck.metadata["trained"] is False and "untrained" in ck.metadata["note"]
    fresh = tmp_path / "d.pt"
    make_init_weights(fresh)
    assert torch.equal(read_checkpoint(fresh).w2, ck.w2) and torch.equal(read_checkpoint(fresh).w3, ck.w3)


def test_shipped_default_is_trained_small_and_used_by_default() -> None:
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 100_000
    ck = read_checkpoint(DEFAULT_WEIGHTS)
    assert ck.metadata["trained"] is True and ck.metadata["seed"] == 0
    assert not torch.equal(ck.w2, read_checkpoint(INIT_WEIGHTS).w2)  # STDP moved Conv2
    enc = Encoder(_cfg(), 1)  # one checkpoint serves merged-polarity input too
    load_into(enc, None)
    assert torch.equal(enc.w2, ck.w2)


def test_weights_are_size_independent(tmp_path: Path) -> None:
    enc = Encoder(_cfg(), 2)
    load_into(enc, DEFAULT_WEIGHTS)
    for h, w in ((34, 34), (27, 35), (64, 80)):
        out, _ = enc.step(torch.zeros(1, 2, h, w), None)
        assert out.layer_spikes["conv1"].shape[-2:] == (h, w)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "code_ran"
    p = tmp_path / "evil.pt"
    if how == "torch_save":
        torch.save({"format": FORMAT, "w2": _Evil(str(marker))}, p)
    else:
        p.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    with pytest.raises(NodeError, match="refused|not a SpikeStream checkpoint") as e:
        read_checkpoint(p)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # control: plain pickle.load on the same payload *would* run the code
    if how == "raw_pickle":
        pickle.loads(p.read_bytes())
        assert marker.exists()


def test_not_a_checkpoint_and_wrong_version(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(NodeError, match="not a SpikeStream checkpoint"):
        read_checkpoint(junk)
    # seeded junk: random bytes once failed with a bare KeyError from torch's unpickler
    rng = np.random.default_rng(7)
    for i in range(300):
        junk.write_bytes(rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        with pytest.raises(NodeError, match="not a SpikeStream checkpoint"):
            read_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(NodeError, match="no 'format' key"):
        read_checkpoint(plain)
    enc = Encoder(_cfg(), 2)
    p = tmp_path / "v0.pt"
    save_checkpoint(p, enc, {})
    data = torch.load(p, weights_only=True)
    data["format"] = "spikestream.ckpt.v0"
    torch.save(data, p)
    with pytest.raises(NodeError, match="spikestream.ckpt.v0.*reads 'spikestream.ckpt.v1'"):
        read_checkpoint(p)
    data["format"] = FORMAT
    data["extra"] = 1
    torch.save(data, p)
    with pytest.raises(NodeError, match="unknown keys \\['extra'\\]"):
        read_checkpoint(p)


def test_n_classes_and_shape_mismatch_messages(tmp_path: Path) -> None:
    p = tmp_path / "two.pt"
    save_checkpoint(p, Encoder(_cfg(n_classes=2), 2), {})
    with pytest.raises(UsageError, match="has n_classes=2, config has 1; pass --n-classes 2 or another checkpoint"):
        load_into(Encoder(_cfg(), 2), p)
    data = torch.load(p, weights_only=True)
    data["w2"] = torch.zeros(36, 4, 3, 3)
    torch.save(data, p)
    with pytest.raises(UsageError, match="w2 has shape \\(36, 4, 3, 3\\)"):
        load_into(Encoder(_cfg(n_classes=2), 2), p)
