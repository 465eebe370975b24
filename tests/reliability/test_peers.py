"""Catalogue 2, peers: network sources that refuse or close, no camera, subscribers that are
slow, crash or reconnect, a port in use, two pipelines side by side.  Real processes and
sockets throughout; every child has a timeout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sinks.subscriber import MaskSubscriber
from tests.reliability.util import ROOT, Proc, cli, free_port, small_cfg
from tests.sources.test_network import serve

# A subscriber child: mode "slow" subscribes and never reads (RCVHWM 1); mode "crash"
# reads 5 messages, says so, and dies without closing anything.
SUB_CHILD = textwrap.dedent(
    """
    import os, sys, zmq
    endpoint, mode = sys.argv[1], sys.argv[2]
    s = zmq.Context().socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.SUBSCRIBE, b"masks")
    s.connect(endpoint)
    print("connected", flush=True)
    if mode == "slow":
        sys.stdin.read()  # never reads a message; ends when the test closes stdin
    else:
        for _ in range(5):
            s.recv_multipart()
        print("got 5", flush=True)
        os._exit(3)
    """
)


def _sub_child(endpoint: str, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SUB_CHILD, endpoint, mode], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "connected"
    return p


def test_network_source_refused(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    r = cli(["-c", str(small_cfg(tmp_path)), "--source", f"tcp://127.0.0.1:{port}", "--sink", f"overlay:{tmp_path / 'v.mp4'}"],
            tmp_path, timeout=60)
    assert r.rc == 1, r.stderr
    line = r.one_error()
    assert "connection refused" in line and str(port) in line


def test_network_server_closing_mid_stream_ends_the_run_cleanly(tmp_path: Path) -> None:
    port = free_port()
    server = serve(f"127.0.0.1:{port}", 30_000, (64, 48))
    try:
        stats = tmp_path / "s.json"
        r = cli(["-c", str(small_cfg(tmp_path)), "--source", f"tcp://127.0.0.1:{port}", "--log-level", "INFO",
                 "--sink", f"overlay:{tmp_path / 'v.mp4'}", "--stats-json", str(stats)], tmp_path, timeout=60)
    finally:
        server.kill()
        server.wait(10)
    assert r.rc == 0, r.stderr
    assert not r.error_lines
    assert "closed the stream" in r.stderr  # logged (INFO), and the run ended by itself
    assert json.loads(stats.read_text())["summary"]["events_in"] == 30_000


def test_no_camera(tmp_path: Path) -> None:
    r = cli(["-c", str(small_cfg(tmp_path)), "--source", "camera", "--sink", f"overlay:{tmp_path / 'v.mp4'}"], tmp_path, timeout=60)
    assert r.rc == 1, r.stderr
    assert "no event camera found" in r.one_error()


def test_port_already_in_use(tmp_path: Path) -> None:
    import zmq

    port = free_port()
    ctx = zmq.Context()
    squat = ctx.socket(zmq.PUB)
    squat.bind(f"tcp://127.0.0.1:{port}")
    try:
        r = cli(["-c", str(small_cfg(tmp_path)), "--duration", "0.1", "--sink", f"zmq:tcp://127.0.0.1:{port}"], tmp_path, timeout=60)
    finally:
        squat.close(0)
        ctx.term()
    assert r.rc == 1, r.stderr
    line = r.one_error()
    assert "address in use" in line and str(port) in line


@pytest.mark.slow
def test_slow_crashing_and_reconnecting_subscribers_never_stall_the_publisher(tmp_path: Path) -> None:
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    stats = tmp_path / "s.json"
    cfg = small_cfg(tmp_path, binner={"bin_us": 5000})
    pub = Proc(["-c", str(cfg), "--realtime", "--duration", "4", "--sink", f"zmq:{ep}", "--zmq-hwm", "10",
                "--wait-subscribers", "3", "--stats-json", str(stats)], tmp_path)
    slow = _sub_child(ep, "slow")
    crash = _sub_child(ep, "crash")
    try:
        with MaskSubscriber(ep) as sub:
            first = [sub.recv(30) for _ in range(10)]
            assert all(m is not None for m in first)
        assert crash.wait(30) == 3 and crash.stdout.readline().strip() == "got 5"  # it died mid-stream
        with MaskSubscriber(ep) as sub2:  # reconnect: a new subscriber picks the stream up again
            again = [sub2.recv(30) for _ in range(10)]
        assert all(m is not None for m in again)
        assert again[0].seq > first[-1].seq
        r = pub.finish(timeout=60)
    finally:
        slow.stdin.close()
        slow.wait(10)
        crash.kill()
        pub.kill()
    assert r.rc == 0, r.stderr
    st = json.loads(stats.read_text())
    c, drops = st["metrics"]["counters"], st["summary"]["drops"]
    # 4 s of 5 ms bins; every mask handed to ZeroMQ (the send never blocked on a subscriber);
    # on 2 busy cores the model may shed steps, and those are counted
    assert c["steps"] == 800 and c["zmq.sent"] == c["masks"], c
    assert c["masks"] + drops.get("model_in", 0) == c["steps"], (c, drops)
    assert drops.get("sink:zmq", 0) == 0


@pytest.mark.slow
def test_two_pipelines_publish_on_different_ports(tmp_path: Path) -> None:
    eps = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for k, ep in enumerate(eps):
        d = tmp_path / f"p{k}"
        d.mkdir()
        cfg = small_cfg(d, binner={"bin_us": 5000}, synthetic={"seed": k})
        procs.append(Proc(["-c", str(cfg), "--realtime", "--duration", "2", "--sink", f"zmq:{ep}",
                           "--wait-subscribers", "1"], d))
    try:
        subs = [MaskSubscriber(ep) for ep in eps]
        try:
            got = [[s.recv(30) for _ in range(20)] for s in subs]
        finally:
            for s in subs:
                s.close()
        results = [p.finish(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for msgs in got:
        assert all(m is not None for m in msgs)
        assert [m.seq for m in msgs] == sorted(m.seq for m in msgs)
    assert all(r.rc == 0 for r in results), [r.stderr for r in results]
