"""DV network input: a real dv.io.NetworkWriter served from a child process."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream.config import Config, build
from stream.events import EventPacket, SensorSize
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SOURCES, resolve
from sources.network import NetworkConfig, NetworkSource, normalize_target
from tests.sources.aedat_util import concat, random_events

ROOT = Path(__file__).resolve().parents[2]

# The server: a NetworkWriter that waits for one client, sends N events in packets of
# 1000, waits until they left its queue, then exits hard (its destructor can hang with
# clients attached, hence os._exit; the test kills it anyway).
SERVER = textwrap.dedent(
    """
    import os, sys, threading, time
    import dv_processing as dv

    def wait_until(cond, timeout_s):
        # wait for cond() with a timeout, re-checking every 5 ms (no fixed sleeps)
        tick, end = threading.Event(), time.monotonic() + timeout_s
        while not cond() and time.monotonic() < end:
            tick.wait(0.005)

    from tests.sources.aedat_util import random_events, to_store
    addr, n, w, h, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    stream = dv.io.Stream.EventStream(0, "events", "TEST_NET", (w, h))
    if addr.startswith("unix:"):
        srv = dv.io.NetworkWriter(dv.Path(addr[5:]), stream)
    else:
        host, port = addr.rsplit(":", 1)
        srv = dv.io.NetworkWriter(host, int(port), stream)
    print("listening", flush=True)
    wait_until(lambda: srv.getClientCount() > 0, 20)
    threading.Event().wait(hold)  # the scenario: a server that holds back its data
    ev = random_events(n, (w, h), seed=5)
    for i in range(0, n, 1000):
        srv.writeEvents(to_store(ev[i:i + 1000]))
    wait_until(lambda: srv.getQueuedPacketCount() == 0, 20)
    threading.Event().wait(0.2)  # let the socket flush the last packet before the hard exit
    os._exit(0)
    """
)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve(addr: str, n: int, size: tuple[int, int], hold_s: float = 0.0) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", SERVER, addr, str(n), str(size[0]), str(size[1]), str(hold_s)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    return p


def receive(target: str, **cfg) -> tuple[NetworkSource, list]:
    src = NetworkSource(target, build(NetworkConfig, cfg))
    src.open(RunContext(stop=threading.Event(), metrics=Metrics()))
    try:
        items = list(src.packets())
    finally:
        src.close()
    return src, items


def check_round_trip(target: str, server: subprocess.Popen, n: int, size: tuple[int, int]) -> list:
    try:
        src, items = receive(target)
    finally:
        server.kill()
        server.wait()
    assert src.size == SensorSize(*size)
    got = concat([p.events for p in items if len(p)])
    want = random_events(n, size, seed=5)
    assert len(got) == n and all(np.array_equal(got[k], want[k]) for k in ("timestamp", "x", "y", "polarity"))
    assert "closed the stream" in src.end_message
    ends = [p.t_end_us for p in items]
    assert ends == sorted(ends)  # promises never go backwards
    return items


def test_tcp_round_trip_exact_events() -> None:
    port = free_port()
    items = check_round_trip(f"tcp://127.0.0.1:{port}", serve(f"127.0.0.1:{port}", 5000, (640, 480)), 5000, (640, 480))
    assert all(isinstance(p, EventPacket) for p in items)


def test_unix_socket_round_trip(tmp_path: Path) -> None:
    sock = tmp_path / "dv.sock"
    check_round_trip(f"unix:{sock}", serve(f"unix:{sock}", 3000, (320, 240)), 3000, (320, 240))


def test_quiet_stream_sends_empty_packets_with_advancing_time() -> None:
    port = free_port()
    srv = serve(f"127.0.0.1:{port}", 1000, (64, 48), hold_s=0.0)
    try:
        src = NetworkSource(f"tcp://127.0.0.1:{port}", build(NetworkConfig, {}))
        src.open(RunContext(stop=threading.Event(), metrics=Metrics()))
        items = list(src.packets())  # the server goes quiet ~0.2 s before closing
        src.close()
    finally:
        srv.kill()
        srv.wait()
    last_event = max(int(p.events["timestamp"][-1]) for p in items if len(p))
    empties = [p for p in items if not len(p)]
    assert len(empties) >= 5
    assert all(p.t_end_us > last_event for p in empties[-3:])


def test_connection_refused_fast_and_clear() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(NodeError) as e:
        receive(f"tcp://127.0.0.1:{port}", connect_timeout_s=5.0)
    assert time.monotonic() - t0 < 5.0
    assert str(e.value) == (
        f"cannot connect to tcp://127.0.0.1:{port}: connection refused; is DV (or a NetworkWriter) streaming there?"
    )


def test_missing_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(NodeError, match="no such socket file"):
        receive(f"unix:{tmp_path / 'none.sock'}")


def test_silent_server_times_out() -> None:
    """A TCP server that accepts but never speaks: dv's constructor would block forever."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    t0 = time.monotonic()
    try:
        with pytest.raises(NodeError, match=r"no stream within 1 s"):
            receive(f"tcp://127.0.0.1:{port}", connect_timeout_s=1.0)
    finally:
        srv.close()
    assert time.monotonic() - t0 < 4.0


def test_specs_and_registry() -> None:
    assert normalize_target("net:tcp://h:7") == "tcp://h:7"
    for bad in ("tcp://host", "tcp://:80", "tcp://h:0", "unix:", "udp://h:1"):
        with pytest.raises(UsageError):
            normalize_target(bad)
    cfg = Config({"network": build(NetworkConfig, {})})
    for spec, want in (("tcp://10.0.0.1:7777", "tcp://10.0.0.1:7777"), ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
                       ("net:unix:/tmp/y.sock", "unix:/tmp/y.sock")):
        entry, arg = resolve(SOURCES, spec, "source")
        src = entry.factory(arg, cfg)
        assert isinstance(src, NetworkSource) and src.target == want and src.live
