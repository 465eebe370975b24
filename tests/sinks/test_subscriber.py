"""MaskSubscriber and the ``subscribe`` CLI against live publishers (real sockets and processes)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from sinks.subscriber import MaskSubscriber
from sinks.wire import WireError, encode
from sinks.zmq_pub import ZmqConfig, ZmqPublisher
from stream.events import Instance, MaskResult, SensorSize, Step, make_events
from stream.metrics import Metrics
from stream.node import RunContext

ROOT = Path(__file__).resolve().parents[2]


def _result(i: int, w: int = 64, h: int = 48) -> MaskResult:
    mask = np.zeros((h, w), np.uint8)
    mask[i % h, 2:10] = 2
    step = Step(i, i * 1000, (i + 1) * 1000, None, make_events([i * 1000], [0], [0], [1]), SensorSize(w, h),
                time.perf_counter_ns(), source="unit")
    return MaskResult(step, mask, [Instance(4, 2, (2, i % h, 9, i % h), 8)])


@pytest.fixture
def publisher() -> Iterator[tuple[ZmqPublisher, RunContext]]:
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", wait_subscribers=1))
    ctx = RunContext(stop=threading.Event(), metrics=Metrics())
    pub.open(ctx)
    yield pub, ctx
    ctx.stop.set()
    pub.close()


class RawPub:
    """An XPUB that sends whatever bytes a test wants (a hostile publisher)."""

    def __init__(self) -> None:
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def wait_subscriber(self) -> None:
        assert self.sock.poll(10_000), "no subscription arrived"
        self.sock.recv()

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def close(self) -> None:
        self.sock.close()
        self.zctx.term()


@pytest.fixture
def rawpub() -> Iterator[RawPub]:
    p = RawPub()
    yield p
    p.close()


def _good(seq: int) -> bytes:
    return encode(_result(seq), seq, latency_us=1)


def test_recv_typed_messages_and_gaps(publisher: tuple[ZmqPublisher, RunContext]) -> None:
    pub, ctx = publisher
    with MaskSubscriber(pub.endpoint) as sub:
        pub.wait_ready(ctx.stop)
        pub.process(_result(0))
        pub.process(_result(1))
        pub.seq += 3  # as if three messages were dropped at the high-water mark
        pub.process(_result(2))
        msgs = [sub.recv(10) for _ in range(3)]
        assert [m.seq for m in msgs] == [0, 1, 5]
        assert sub.last_gap == 3 and sub.missed == 3 and sub.gaps == 1 and sub.received == 3
        m = msgs[2]
        assert m.step == 2 and m.mask.shape == (48, 64) and m.mask[2, 2] == 2 and m.mask_pixels == 8
        assert m.instances == (Instance(4, 2, (2, 2, 9, 2), 8),)
        assert sub.recv(0.05) is None  # timeout: nothing more


def test_invalid_messages_raise_and_the_subscriber_survives(rawpub: RawPub) -> None:
    with MaskSubscriber(rawpub.endpoint) as sub:
        rawpub.wait_subscriber()
        bad = msgpack.unpackb(_good(0), raw=False)
        bad["schema"] = "mask.v9"
        rawpub.send(b"masks", msgpack.packb(bad, use_bin_type=True))
        rawpub.send(b"masks", b"only", b"three frames")
        rawpub.send(b"masks", _good(1))
        with pytest.raises(WireError, match="unsupported schema 'mask.v9'"):
            sub.recv(10)
        with pytest.raises(WireError, match="expected 2 frames"):
            sub.recv(10)
        assert sub.recv(10).seq == 1  # type: ignore[union-attr]
        assert sub.rejected == 2


def test_hostile_messages_are_rejected_and_skipped(rawpub: RawPub) -> None:
    """zlib bomb, huge array header, oversized frame: rejected; later good messages still arrive."""
    with MaskSubscriber(rawpub.endpoint, max_side=256, skip_invalid=True) as sub:
        rawpub.wait_subscriber()
        obj = msgpack.unpackb(_good(0), raw=False)
        bomb = dict(obj, encoding="zlib-u8", mask=zlib.compress(bytes(32 * 1024 * 1024), 9))
        rawpub.send(b"masks", msgpack.packb(bomb, use_bin_type=True))
        rawpub.send(b"masks", b"\x81" + msgpack.packb("instances") + b"\xdd\xff\xff\xff\xff")
        rawpub.send(b"masks", _good(1))
        msg = sub.recv(10)
        assert msg is not None and msg.seq == 1 and sub.rejected == 2
        assert "inflates to more than" in (sub.last_error or "") or "msgpack" in (sub.last_error or "")

        # A frame above MAXMSGSIZE (256*256 + 4 MiB): ZeroMQ drops the connection, the SUB
        # reconnects by itself, and good messages arrive again.
        rawpub.send(b"masks", bytes(8 * 1024 * 1024))
        got = None
        deadline = time.monotonic() + 20
        seq = 2
        while got is None and time.monotonic() < deadline:
            rawpub.send(b"masks", _good(seq))
            seq += 1
            got = sub.recv(0.1)
        assert got is not None and got.seq >= 2
        assert sub.rejected == 2  # the oversized frame never reached the decoder
        assert sub.reconnects >= 1


def test_other_topics_with_our_prefix_are_skipped(rawpub: RawPub) -> None:
    with MaskSubscriber(rawpub.endpoint, topic="masks") as sub:
        rawpub.wait_subscriber()
        rawpub.send(b"masks2", _good(0))
        rawpub.send(b"masks", _good(1))
        assert sub.recv(10).seq == 1  # type: ignore[union-attr]


def _cli(*args: str, timeout: float = 60) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sinks.subscriber", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_cli_json_lines_against_a_live_publisher(publisher: tuple[ZmqPublisher, RunContext]) -> None:
    pub, ctx = publisher
    proc = _cli("--endpoint", pub.endpoint, "--count", "4", "--json", "--timeout", "30")
    try:
        waiter = threading.Thread(target=pub.wait_ready, args=(ctx.stop,))
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive(), "the CLI never subscribed"
        for i in range(3):
            pub.process(_result(i))
        pub.seq += 2
        pub.process(_result(3))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["gap"] for r in rows] == [0, 0, 0, 2]
    assert rows[1]["mask_pixels"] == 8 and rows[1]["instances"][0]["bbox"] == [2, 1, 9, 1]
    assert "received 4 message(s); 2 missed in 1 gap(s)" in err


def test_cli_text_lines(publisher: tuple[ZmqPublisher, RunContext]) -> None:
    pub, ctx = publisher
    proc = _cli("--endpoint", pub.endpoint, "--count", "2", "--timeout", "30")
    try:
        waiter = threading.Thread(target=pub.wait_ready, args=(ctx.stop,))
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive(), "the CLI never subscribed"
        pub.process(_result(0))
        pub.process(_result(1))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and "step      1" in lines[1] and "mask      8 px" in lines[1] and "#4:c2" in lines[1]


def test_cli_timeout_without_publisher() -> None:
    proc = _cli("--endpoint", "tcp://127.0.0.1:1", "--count", "1", "--timeout", "0.3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""
    assert "no message for 0.3 s on tcp://127.0.0.1:1" in err


def test_cli_bad_arguments() -> None:
    proc = _cli("--count", "-1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--count -1 is not allowed" in err


def test_curve_keys_must_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="both"):
        MaskSubscriber("tcp://127.0.0.1:5556", curve_server_key="server.key")


_COUNTING_SUBSCRIBER = """
import sys, time
from sinks.subscriber import MaskSubscriber
with MaskSubscriber(sys.argv[1], rcvhwm=100_000) as sub:
    print("ready", flush=True)
    n, deadline = 0, time.monotonic() + 30
    while n < int(sys.argv[2]) and time.monotonic() < deadline:
        n += sub.recv(timeout=0.05) is not None
    # keep polling after the publisher is gone: the disconnect must not abort us
    idle = time.monotonic() + 0.5
    while time.monotonic() < idle:
        sub.recv(timeout=0.05)
print(n, flush=True)
"""


def test_subscriber_survives_a_publisher_that_sends_a_burst_and_closes() -> None:
    """libzmq 4.3.5 aborted the subscriber process ("Assertion failed: !_more
    (src/fq.cpp:80)") when it disconnected while the closed connection still held
    messages; the reconnect now waits until the socket is drained."""
    n = 300
    for _ in range(3):
        zctx = zmq.Context()
        sock = zctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.bind("tcp://127.0.0.1:*")
        ep = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        proc = subprocess.Popen([sys.executable, "-c", _COUNTING_SUBSCRIBER, ep, str(n)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert sock.poll(20_000), "no subscription arrived"
            sock.recv()
            for i in range(n):
                sock.send_multipart([b"masks", _good(i)])
        finally:
            sock.close()
            zctx.term()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.strip().splitlines()[-1:]
        assert out.split()[-1] == str(n)
