"""ZeroMQ publisher: real sockets, a publisher in a child process, raw pyzmq + msgpack readers."""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from sinks.subscriber import MaskSubscriber
from sinks.zmq_pub import ZmqConfig, ZmqPublisher, is_loopback, make_curve_keys
from stream.config import Config, build
from stream.events import Instance, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.metrics import Metrics
from stream.node import NodeError, RunContext, UsageError
from stream.registry import SINKS

BIN_US = 10_000
W, H = 346, 260


def _mask(i: int, w: int = W, h: int = H) -> np.ndarray:
    """A mask that differs per step: a horizontal band of class 1 + (i % 3) at row i % h."""
    m = np.zeros((h, w), np.uint8)
    m[i % h, : (i % w) + 1] = 1 + i % 3
    return m


def _result(i: int, w: int = W, h: int = H, source: str = "test") -> MaskResult:
    ev = make_events([i * BIN_US + 5], [i % w], [i % h], [1])
    step = Step(i, i * BIN_US, (i + 1) * BIN_US, None, ev, SensorSize(w, h), time.perf_counter_ns(), source=source)
    return MaskResult(step, _mask(i, w, h), [Instance(1, 1 + i % 3, (0, i % h, i % w, i % h), (i % w) + 1)])


def _ctx() -> RunContext:
    return RunContext(stop=threading.Event(), metrics=Metrics())


def _publisher_child(conn: Any, n: int, cfg_kwargs: dict[str, Any], w: int, h: int) -> None:
    """Child process: open a publisher, report its endpoint, wait for subscribers, publish n steps."""
    pub = ZmqPublisher(ZmqConfig(**cfg_kwargs))
    ctx = _ctx()
    try:
        pub.open(ctx)
    except NodeError as e:
        conn.send(("error", str(e)))
        return
    try:
        conn.send(("bound", pub.endpoint))
        pub.wait_ready(ctx.stop)
        results = [_result(i, w, h) for i in range(n)]
        t = time.perf_counter()
        for r in results:
            pub.process(r)
        dt = time.perf_counter() - t
        conn.send(("done", dt, dict(ctx.metrics.snapshot()["counters"])))
        conn.poll(30)  # keep the socket up until the test has read what it needs
    finally:
        pub.close()


def _start_child(n: int, w: int = W, h: int = H, **cfg_kwargs: Any) -> tuple[Any, Any, str]:
    parent, child = mp.get_context("spawn").Pipe()
    cfg_kwargs.setdefault("endpoint", "tcp://127.0.0.1:*")
    proc = mp.get_context("spawn").Process(target=_publisher_child, args=(child, n, cfg_kwargs, w, h), daemon=True)
    proc.start()
    assert parent.poll(60), "child publisher did not start"
    kind, endpoint = parent.recv()
    assert kind == "bound", endpoint
    return proc, parent, endpoint


def _finish(proc: Any, conn: Any) -> None:
    conn.send("bye")
    proc.join(30)
    assert proc.exitcode == 0


def _raw_sub(zctx: zmq.Context, endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    s.setsockopt(zmq.SUBSCRIBE, b"masks")
    s.connect(endpoint)
    return s


def test_every_step_arrives_from_a_child_process_publisher() -> None:
    n = 300
    proc, conn, endpoint = _start_child(n, wait_subscribers=1)
    zctx = zmq.Context()
    sub = _raw_sub(zctx, endpoint)
    try:
        got = []
        for _ in range(n):
            assert sub.poll(20_000), f"message {len(got)} of {n} did not arrive"
            topic, payload = sub.recv_multipart()
            assert topic == b"masks"
            got.append(msgpack.unpackb(payload, raw=False))
        assert conn.poll(30) and conn.recv()[0] == "done"
    finally:
        sub.close()
        zctx.term()
        _finish(proc, conn)
    assert [m["seq"] for m in got] == list(range(n))  # contiguous: nothing dropped
    assert [m["step"] for m in got] == list(range(n))
    assert got[0]["t0_us"] == 0
    assert all(a["t1_us"] == b["t0_us"] for a, b in zip(got, got[1:]))  # spans tile the input
    assert all(m["t1_us"] - m["t0_us"] == BIN_US for m in got)
    for i, m in enumerate(got):
        assert m["schema"] == "mask.v1" and m["encoding"] == "zlib-u8"
        assert (m["width"], m["height"], m["n_events"], m["source"]) == (W, H, 1, "test")
        mask = np.frombuffer(zlib.decompress(m["mask"]), np.uint8).reshape(m["height"], m["width"])
        np.testing.assert_array_equal(mask, _mask(i))
        assert m["instances"] == [{"id": 1, "class": 1 + i % 3, "bbox": [0, i % H, i % W, i % H], "area": i % W + 1}]
        assert m["latency_us"] >= 0


@pytest.mark.parametrize("nodrop", [False, True])
def test_slow_subscriber_does_not_slow_the_publisher(nodrop: bool) -> None:
    """A subscriber that never reads: the publisher still finishes; the loss is visible.

    Default: ZeroMQ drops silently for that subscriber, the subscriber sees seq gaps.
    nodrop: the publisher's sends are refused and counted as drops.zmq.
    """
    n = 2000
    proc, conn, endpoint = _start_child(
        n, wait_subscribers=1, hwm=10, compress=False, nodrop=nodrop, linger_ms=0
    )
    zctx = zmq.Context()
    slow = _raw_sub(zctx, endpoint, rcvhwm=5)
    try:
        assert conn.poll(60), "publisher blocked on a slow subscriber"
        kind, dt, counters = conn.recv()
        assert kind == "done"
        if nodrop:
            assert counters.get("drops.zmq", 0) > 0
            assert counters["drops.zmq"] + counters["zmq.sent"] == n
        else:
            assert counters.get("drops.zmq", 0) == 0 and counters["zmq.sent"] == n
        # Now read what reached the slow subscriber: far fewer than n, with seq gaps.
        seqs = []
        while slow.poll(2000):
            seqs.append(msgpack.unpackb(slow.recv_multipart()[1], raw=False)["seq"])
        assert 0 < len(seqs) < n
        assert any(b > a + 1 for a, b in zip(seqs, seqs[1:])) or seqs[-1] < n - 1
    finally:
        slow.close()
        zctx.term()
        _finish(proc, conn)


def test_port_in_use_is_a_one_line_node_error() -> None:
    a = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*"))
    a.open(_ctx())
    try:
        b = ZmqPublisher(ZmqConfig(endpoint=a.endpoint))
        with pytest.raises(NodeError) as ei:
            b.open(_ctx())
        b.close()
        port = a.endpoint.rsplit(":", 1)[1]
        assert str(ei.value) == (
            f"cannot bind tcp://127.0.0.1:{port}: address in use; pick another with --sink zmq:tcp://127.0.0.1:PORT"
        )
    finally:
        a.close()


def test_two_publishers_on_different_ports() -> None:
    pubs = [ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", wait_subscribers=1)) for _ in range(2)]
    ctxs = [_ctx(), _ctx()]
    subs = []
    try:
        for p, c in zip(pubs, ctxs):
            p.open(c)
        assert pubs[0].endpoint != pubs[1].endpoint
        subs = [MaskSubscriber(p.endpoint) for p in pubs]
        for p, c in zip(pubs, ctxs):
            p.wait_ready(c.stop)
        for i in range(5):
            pubs[0].process(_result(i, source="A"))
            pubs[1].process(_result(100 + i, source="B"))
        a = [subs[0].recv(10) for _ in range(5)]
        b = [subs[1].recv(10) for _ in range(5)]
        assert [m.source for m in a] == ["A"] * 5 and [m.step for m in a] == list(range(5))
        assert [m.source for m in b] == ["B"] * 5 and [m.step for m in b] == list(range(100, 105))
        assert [m.seq for m in b] == list(range(5))  # seq is per publisher
    finally:
        for s in subs:
            s.close()
        for p in pubs:
            p.close()


def test_curve_authorised_client_receives_unauthorised_does_not(tmp_path: Path) -> None:
    keys = make_curve_keys(tmp_path / "keys", clients=["alice"])
    rogue = make_curve_keys(tmp_path / "rogue", clients=["mallory"])  # a valid keypair, not authorised
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", curve_dir=str(tmp_path / "keys"), wait_subscribers=1))
    ctx = _ctx()
    pub.open(ctx)
    good = bad = plain = None
    try:
        good = MaskSubscriber(pub.endpoint, curve_server_key=keys.server_public, curve_client_key=keys.clients["alice"])
        bad = MaskSubscriber(pub.endpoint, curve_server_key=keys.server_public, curve_client_key=rogue.clients["mallory"])
        plain = MaskSubscriber(pub.endpoint)
        pub.wait_ready(ctx.stop)
        for i in range(20):
            pub.process(_result(i))
        assert [good.recv(10).seq for _ in range(20)] == list(range(20))  # type: ignore[union-attr]
        assert bad.recv(0.5) is None
        assert plain.recv(0.2) is None
        assert pub.subscribers == 1
    finally:
        for s in (good, bad, plain):
            if s is not None:
                s.close()
        pub.close()


def test_curve_dir_without_keys_is_a_node_error(tmp_path: Path) -> None:
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", curve_dir=str(tmp_path)))
    with pytest.raises(NodeError, match="make_curve_keys"):
        pub.open(_ctx())
    pub.close()


def test_wait_ready_returns_when_stop_is_set() -> None:
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", wait_subscribers=3))
    ctx = _ctx()
    pub.open(ctx)
    try:
        t = threading.Thread(target=pub.wait_ready, args=(ctx.stop,))
        t.start()
        t.join(0.3)
        assert t.is_alive()  # nobody subscribed: still waiting
        ctx.stop.set()
        t.join(5)
        assert not t.is_alive()
    finally:
        pub.close()


def test_wait_ready_counts_subscribers_to_our_topic_only() -> None:
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", wait_subscribers=2))
    ctx = _ctx()
    pub.open(ctx)
    zctx = zmq.Context()
    socks = []
    try:
        for prefix in (b"other", b"masks", b""):  # "" subscribes to everything, so it counts
            s = zctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, prefix)
            s.connect(pub.endpoint)
            socks.append(s)
        t = threading.Thread(target=pub.wait_ready, args=(ctx.stop,))
        t.start()
        t.join(10)
        assert not t.is_alive() and pub.subscribers == 2
    finally:
        ctx.stop.set()
        for s in socks:
            s.close()
        zctx.term()
        pub.close()


def test_reset_items_are_not_published_and_close_is_idempotent() -> None:
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*"))
    ctx = _ctx()
    pub.open(ctx)
    pub.process(StreamReset("loop"))
    assert pub.seq == 0
    pub.close()
    pub.close()
    with pytest.raises(NodeError, match="after close"):
        pub.process(_result(0))


def test_non_loopback_endpoint_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("tcp://127.0.0.1:5556") and is_loopback("ipc:///tmp/x") and not is_loopback("tcp://*:5556")
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://0.0.0.0:*"))
    with caplog.at_level(logging.WARNING, logger="sinks.zmq"):
        pub.open(_ctx())
    pub.close()
    assert any("reachable from other machines" in r.getMessage() for r in caplog.records)


def test_config_and_factory() -> None:
    assert ZmqConfig().endpoint == "tcp://127.0.0.1:5556" and ZmqConfig().hwm >= 1000
    for bad in ({"endpoint": "http://x:1"}, {"endpoint": "tcp://127.0.0.1"}, {"hwm": 0}, {"topic": ""}):
        with pytest.raises(UsageError):
            build(ZmqConfig, bad)
    cfg = Config({"zmq": build(ZmqConfig, {"topic": "t2"})})
    make = SINKS["zmq"].factory  # registered on import of sinks
    sink = make("tcp://127.0.0.1:5557", cfg)
    assert isinstance(sink, ZmqPublisher) and sink.cfg.endpoint == "tcp://127.0.0.1:5557" and sink.cfg.topic == "t2"
    assert make(None, cfg).cfg.endpoint == "tcp://127.0.0.1:5556"
    with pytest.raises(UsageError, match="not allowed"):
        make("nonsense", cfg)
