"""The benchmarks run (tiny configuration) and produce their JSON keys; peers equal our node.

Not timed tests: figures are not asserted, only that every part runs, reports rows with
median/min/max, and writes the JSON/text/PNG outputs.  Peer equality with the model node
is asserted where the peer is installed (skipped otherwise).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_model, inputs, peers
from benchmarks.common import BenchSettings, Results, Row, Stat, measure_rate
from benchmarks.run import main, run_all
from stream.events import SensorSize

TINY = BenchSettings(repeats=1, warmup=0, tiny=True)


def test_measure_rate_reports_median_min_max() -> None:
    calls = []

    def work() -> float:
        calls.append(1)
        return 10.0

    st = measure_rate(work, BenchSettings(repeats=3, warmup=2))
    assert len(calls) == 5
    assert st.n == 3 and st.min <= st.median <= st.max and st.median > 0



def test_measure_rate_runs_setup_before_every_call_outside_the_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``setup`` (a state reset) runs before each warm-up and timed call and is not timed: on a
    fake clock, a setup that takes 10 s and a work call that takes 1 s give amount / 1 s."""
    import benchmarks.common as common

    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    log: list[str] = []

    def setup() -> None:
        log.append("setup")
        now[0] += 10.0

    def work() -> float:
        log.append("work")
        now[0] += 1.0
        return 1000.0

    st = measure_rate(work, BenchSettings(repeats=2, warmup=1), setup=setup)
    assert log == ["setup", "work"] * 3
    assert st.min == st.max == 1000.0  # 11 s per call would give ~91/s


def test_row_marks_targets() -> None:
    assert Row("x", "fast", Stat(3.0, 2.0, 4.0, 3), "u", ">= 2", 2.0).met is True
    assert Row("x", "slow", Stat(1.0, 1.0, 1.0, 1), "u", ">= 2", 2.0).met is False
    assert Row("x", "lat", Stat(7.0, 7.0, 7.0, 1), "ms", "<= 6", 6.0, higher_better=False).met is False
    assert Row("x", "none", Stat(1.0, 1.0, 1.0, 1), "u").met is None


def test_tiny_run_binning_model_peers_writes_outputs(tmp_path: Path) -> None:
    rc = main(["--tiny", "--only", "a,b,c", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["format"] == "spikestream.bench.v1"
    assert (tmp_path / "bench.png").stat().st_size > 1000
    sections = {r["section"] for r in data["rows"]}
    assert {"a binning", "b model"} <= sections
    for r in data["rows"]:
        assert {"median", "min", "max", "n"} <= set(r["stat"]) and "met" in r
        assert r["stat"]["min"] <= r["stat"]["median"] <= r["stat"]["max"] or math.isnan(r["stat"]["median"])
    model_rows = [r for r in data["rows"] if r["section"] == "b model"]
    assert any(r["name"].startswith("scene") for r in model_rows)
    assert all("spikes_per_step" in r["extra"] for r in model_rows)
    peer_rows = [r for r in data["rows"] if r["section"].startswith("c peers")]
    assert any("dense per-step PyTorch" in r["name"] for r in peer_rows)
    # every peer row says whether its outputs equal ours; the dense peer always must
    assert all(r["extra"]["equal_to_ours"] for r in peer_rows if "dense per-step" in r["name"])


def test_bad_only_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tiny", "--only", "z"]) == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_replay_and_live_parts_report_rows() -> None:
    res = run_all(TINY, "de", log=lambda s: None)
    names = {(r.section, r.name) for r in res.rows}
    assert any(s == "d replay e2e" and "Mev/s" for s, _ in names)
    assert any(s == "e live latency 1ms" and "subscriber" in n for s, n in names)


def _model_and_steps(size: SensorSize, n: int):  # type: ignore[no-untyped-def]
    cfg = bench_model.model_config(instances=False)
    node = bench_model.open_node(cfg, size)
    ev = inputs.fallback_scene_events(size, n)
    steps = inputs.bin_steps(ev, size)
    return node, steps


def _assert_peer_equal(peer_cls, size: SensorSize = SensorSize(96, 72), n: int = 25) -> None:  # type: ignore[no-untyped-def]
    node, steps = _model_and_steps(size, n)
    ref = node.process_batch(steps)
    peer = peer_cls(peers.params_from_encoder(node.encoder))
    out = peer.run([s.frame for s in steps])
    diff = peers.compare(out, [r.mask for r in ref], [r.layer_spikes for r in ref])
    assert diff["steps"] == len(steps)
    assert diff["steps_with_count_mismatch"] == 0 and diff["mask_pixels_differing"] == 0, diff
    assert sum(r.layer_spikes["conv1"] for r in ref) > 0  # the comparison saw spikes


def test_dense_peer_equals_node() -> None:
    _assert_peer_equal(peers.DensePeer)


@pytest.mark.skipif(not peers.spikingjelly_available(), reason="spikingjelly not installed (make bench installs it)")
def test_spikingjelly_peer_equals_node() -> None:
    _assert_peer_equal(peers.SpikingJellyPeer)


@pytest.mark.skipif(not peers.snntorch_available(), reason="snntorch not installed (make bench installs it)")
def test_snntorch_peer_equals_node() -> None:
    _assert_peer_equal(peers.SnnTorchPeer)


def test_peers_refuse_configs_they_do_not_implement() -> None:
    cfg = bench_model.model_config(mask_window_mode="decay", instances=False)
    node = bench_model.open_node(cfg, SensorSize(32, 32))
    with pytest.raises(ValueError, match="mask_window_mode=decay"):
        peers.params_from_encoder(node.encoder)


def test_macs_match_perf_notes_at_346x260() -> None:
    mb = bench_model.macs_bytes(SensorSize(346, 260))
    # PERF-NOTES: Conv1 18, Conv2 81, Conv3 10 MMAC per step
    assert round(mb["conv1_mmac"]) == 18 and round(mb["conv2_mmac"]) == 81 and round(mb["conv3_mmac"]) == 10


def test_tiny_adaptation_part_reports_update_cost(tmp_path: Path) -> None:
    rc = main(["--tiny", "--only", "f", "--out", str(tmp_path)])
    assert rc == 0
    rows = [r for r in json.loads((tmp_path / "bench.json").read_text())["rows"] if r["section"] == "f online adaptation"]
    update = [r for r in rows if r["name"].startswith("one Conv2 update")]
    assert update and update[0]["unit"] == "ms" and update[0]["stat"]["median"] > 0
    assert update[0]["extra"]["updates"] >= 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with CUDA, part g times the GPU instead")
def test_tiny_cuda_proxy_counts_host_ops_per_step() -> None:
    """Part g without a GPU: the CUDA window recipe's host ops per step, eager vs compiled."""
    res = run_all(TINY, "g", log=lambda s: None)
    rows = {r.name: r for r in res.rows if r.section == "g cuda model"}
    assert len(rows) == 2 and all(r.unit == "ops/step" and r.stat.median > 0 for r in rows.values())
    for inst in ("off",):  # tiny runs instances off only (one compilation); make bench adds "on"
        eager = rows[f"CUDA recipe ops/step (CPU), inst {inst}, eager scans, crop decode"].stat.median
        now = rows[f"CUDA recipe ops/step (CPU), inst {inst}, compiled scans, full decode"].stat.median
        assert now < eager / 3
