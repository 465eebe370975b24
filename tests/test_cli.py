"""run.py end to end, in real subprocesses: help, usage errors, a synthetic run, a replay to ZeroMQ."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--quiet"]


def run_cli(*args: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_source_and_sink_with_an_example() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("synthetic", "camera", "file", "net", "zmq", "overlay", "record"):
        assert f"  {name}" in r.stdout, name
    assert r.stdout.count("e.g. --source") >= 4 and r.stdout.count("e.g. --sink") >= 3
    for sub in ("train", "eval", "subscribe"):
        assert sub in r.stdout
    for flag in ("--device", "--duration", "--weights", "--config", "--print-config", "--realtime", "--loop"):
        assert flag in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--source", "webcam"], "unknown source 'webcam'; valid sources: synthetic"),
        (["--sink", "printer"], "unknown sink 'printer'; valid sinks:"),
        (["--preset", "nope", "--print-config"], "unknown preset 'nope'"),
        (["--duration", "-1"], "--duration"),
        (["--bin-us", "0"], "bin_us=0 out of range"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    r = run_cli(*args, "--output", str(tmp_path), *QUIET)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("binner:\n  bin_size: 3\n")
    r = run_cli("--config", str(cfg), "--print-config")
    assert r.returncode == 2 and "binner.bin_size" in r.stderr and "bin_us" in r.stderr


def test_print_config_round_trips_and_flags_override(tmp_path: Path) -> None:
    r = run_cli("--print-config", "--bin-us", "2500", "--device", "cpu")
    assert r.returncode == 0
    (tmp_path / "c.yaml").write_text(r.stdout)
    r2 = run_cli("--config", str(tmp_path / "c.yaml"), "--print-config")
    assert r2.returncode == 0 and r2.stdout == r.stdout
    assert "bin_us: 2500" in r.stdout


def test_synthetic_run_exits_0_and_reports_steps(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    video = tmp_path / "o.mp4"
    r = run_cli(
        "--source", "synthetic", "--duration", "0.5", "--bin-us", "5000", "--device", "cpu",
        "--sink", f"overlay:{video}", "--stats-json", str(stats), "--output", str(tmp_path / "runs"), *QUIET,
    )
    assert r.returncode == 0, r.stderr
    assert "summary: 100 steps, 100 masks" in r.stderr
    s = json.loads(stats.read_text())
    assert s["summary"]["steps"] == 100 and s["summary"]["exit_code"] == 0
    assert "latency.e2e" in s["metrics"]["latency"]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "config.yaml").is_file()
    assert video.stat().st_size > 0


def test_replay_to_zmq_every_step_arrives_in_order(tmp_path: Path) -> None:
    """The issue's wire test: raw pyzmq + msgpack (not our client), contiguous seq, tiled spans."""
    from tests.sources.aedat_util import random_events, write_aedat4
    from stream.events import SensorSize

    size = SensorSize(64, 48)
    ev = random_events(20000, (64, 48), t0_us=1_000_000, span_us=200_000, seed=3)
    rec = write_aedat4(tmp_path / "r.aedat4", ev, size)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--source", str(rec), "--sink", f"zmq:{endpoint}",
         "--wait-subscribers", "1", "--bin-us", "2000", "--device", "cpu", "--output", str(tmp_path), *QUIET],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    n_steps = int(np.ceil((ev["timestamp"][-1] - ev["timestamp"][0] + 1) / 2000))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"masks")
    sub.connect(endpoint)
    msgs, topics = [], set()
    try:
        # every step, then whatever else comes until the run has exited and the socket is
        # quiet (an extra message fails the count below); each wait is bounded
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sub.poll(200):
                topic, payload = sub.recv_multipart()
                topics.add(topic)
                msgs.append(msgpack.unpackb(payload, raw=False))
            elif proc.poll() is not None and not sub.poll(500):
                break
    finally:
        sub.close(0)
        ctx.term()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert topics == {b"masks"}
    assert len(msgs) == n_steps
    assert [m["seq"] for m in msgs] == list(range(n_steps))
    assert [m["step"] for m in msgs] == list(range(n_steps))
    assert all(m["schema"] == "mask.v1" for m in msgs)
    # time spans tile the recording from its first event
    assert msgs[0]["t0_us"] == int(ev["timestamp"][0])
    assert all(a["t1_us"] == b["t0_us"] for a, b in zip(msgs, msgs[1:]))
    assert msgs[-1]["t1_us"] > int(ev["timestamp"][-1])
    assert sum(m["n_events"] for m in msgs) == len(ev)
    for m in msgs[:5]:
        raw = zlib.decompress(m["mask"]) if m["encoding"] == "zlib-u8" else m["mask"]
        assert np.frombuffer(raw, np.uint8).reshape(m["height"], m["width"]).shape == (48, 64)
