"""Read the ``mask.v1`` topic: a Python API (:class:`MaskSubscriber`) and ``run.py subscribe``.

::

    with MaskSubscriber("tcp://127.0.0.1:5556") as sub:
        for msg in sub:                      # MaskMessage: .mask (H, W) uint8, .instances ...
            print(msg.step, msg.mask_pixels, sub.last_gap)

A hostile or broken publisher cannot exhaust memory: frames above ``MAXMSGSIZE`` make
ZeroMQ drop the connection (it reconnects by itself), msgpack lengths are capped and
zlib output is capped at width*height (see :mod:`sinks.wire`).  An invalid message
raises :class:`sinks.wire.WireError` from ``recv`` (or is skipped and counted in
``rejected`` with ``skip_invalid=True``); the subscriber stays usable either way.

Sequence gaps: ``seq`` counts every message the publisher handed to ZeroMQ, so
``seq - last_seq - 1`` messages were lost (at a high-water mark or while connecting).
A ``seq`` that goes backwards means the publisher restarted; it is not counted as a gap.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from .wire import MAX_SIDE, MaskMessage, WireError, decode

log = logging.getLogger("sinks.subscriber")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
#: Frame-size cap over the largest legal payload (mask + instance list + keys).
_FRAME_SLACK = 4 * 1024 * 1024


class MaskSubscriber:
    """A SUB socket on ``endpoint`` subscribed to ``topic``, yielding :class:`MaskMessage`.

    ``max_side`` caps width and height (and so the frame size, via ``MAXMSGSIZE``).
    ``curve_server_key`` (the publisher's ``server.key``) and ``curve_client_key`` (this
    client's ``.key_secret``) enable CURVE.  Counters: ``received``, ``missed`` (messages
    lost, from seq gaps), ``gaps`` (gap events), ``rejected`` (invalid messages),
    ``last_gap`` (messages missed right before the last message returned).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        topic: str = "masks",
        *,
        rcvhwm: int = 1000,
        max_side: int = MAX_SIDE,
        curve_server_key: str | Path | None = None,
        curve_client_key: str | Path | None = None,
        skip_invalid: bool = False,
    ) -> None:
        if not (1 <= max_side <= MAX_SIDE):
            raise ValueError(f"max_side={max_side} is not allowed; use 1..{MAX_SIDE}")
        if (curve_server_key is None) != (curve_client_key is None):
            raise ValueError("CURVE needs both curve_server_key (server.key) and curve_client_key (NAME.key_secret)")
        self.endpoint = endpoint
        self.topic = topic.encode()
        self.max_side = max_side
        self.skip_invalid = skip_invalid
        self.received = 0
        self.missed = 0
        self.gaps = 0
        self.rejected = 0
        self.last_gap = 0
        self.last_seq: int | None = None
        self.last_error: str | None = None
        self.reconnects = 0
        self._reconnect_due = False  # a disconnect was seen; reconnect once the socket is drained
        self._mon: zmq.Socket | None = None
        self._zctx = zmq.Context()
        self._sock = self._zctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_side * max_side + _FRAME_SLACK)
        if curve_server_key is not None:
            server_public, _ = _load_key(Path(curve_server_key), need_secret=False)
            client_public, client_secret = _load_key(Path(curve_client_key), need_secret=True)  # type: ignore[arg-type]
            self._sock.curve_serverkey = server_public
            self._sock.curve_publickey = client_public
            self._sock.curve_secretkey = client_secret
        self._sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        # libzmq treats a frame above MAXMSGSIZE as a protocol error and closes that
        # connection for good (no automatic reconnect).  We watch for disconnects and
        # reconnect ourselves, so a hostile frame costs one reconnect, not the subscriber.
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot connect to {endpoint!r}: {e.strerror}; use tcp://HOST:PORT") from None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "MaskSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and context (idempotent)."""
        if self._mon is not None:
            self._sock.disable_monitor()
            self._mon.close()
            self._mon = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None  # type: ignore[assignment]
        if self._zctx is not None:
            self._zctx.term()
            self._zctx = None  # type: ignore[assignment]

    # -- receiving ------------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> MaskMessage | None:
        """The next message, or None when none arrived within ``timeout`` seconds (None = wait).

        Raises :class:`WireError` for an invalid message unless ``skip_invalid``.
        Frames for other topics that share our prefix are skipped.
        """
        if self._sock is None:
            raise ValueError("MaskSubscriber is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ms = None if remaining is None else int(remaining * 1000)
            # poll in slices so Ctrl-C is handled promptly on every platform
            events = dict(self._poller.poll(200 if ms is None else min(ms, 200)))
            if self._mon in events:
                self._reconnect_due = True
            if self._sock not in events:
                if self._reconnect_due:
                    # Only once nothing is left to read: disconnect() while the dropped
                    # connection's pipe still holds messages aborts the process inside
                    # libzmq 4.3.5 ("Assertion failed: !_more (src/fq.cpp:80)"; 8 of 8
                    # runs when a publisher sent 300 masks and closed).  Messages already
                    # received are delivered first.
                    self._reconnect()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sock.recv_multipart(copy=True)
            if frames and frames[0] != self.topic and len(frames) == 2:
                continue  # another topic with our prefix (e.g. "masks2" for "masks")
            try:
                if len(frames) != 2:
                    raise WireError(f"expected 2 frames [topic, payload], got {len(frames)}")
                msg = decode(frames[1], max_side=self.max_side)
            except WireError as e:
                self.rejected += 1
                self.last_error = str(e)
                if not self.skip_invalid:
                    raise
                log.warning("rejected message: %s", e)
                continue
            self._track(msg.seq)
            return msg

    def _reconnect(self) -> None:
        """Drain disconnect events and connect again (see ``__init__``)."""
        self._reconnect_due = False
        if self._mon is None:
            return
        while self._mon.poll(0):
            recv_monitor_message(self._mon)
        try:
            self._sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # libzmq already forgot the endpoint; connecting again is all we need
        self._sock.connect(self.endpoint)
        self.reconnects += 1
        log.warning("connection to %s dropped (publisher gone, or a frame over the size cap); reconnecting", self.endpoint)

    def _track(self, seq: int) -> None:
        self.received += 1
        self.last_gap = 0
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.last_gap = seq - self.last_seq - 1
            self.missed += self.last_gap
            self.gaps += 1
        self.last_seq = seq

    def __iter__(self) -> Iterator[MaskMessage]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg


def _load_key(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ValueError(f"CURVE key file {path} not found; make keys with sinks.zmq_pub.make_curve_keys(KEYDIR)")
    public, secret = zmq.auth.load_certificate(str(path))
    if need_secret and secret is None:
        raise ValueError(f"{path} holds no secret key; pass the client's NAME.key_secret file")
    return public, secret


# ------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``run.py subscribe``."""
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"publisher endpoint (default {DEFAULT_ENDPOINT})")
    p.add_argument("--topic", default="masks", help="topic (default masks)")
    p.add_argument("--count", type=int, default=0, help="exit after N messages (default 0 = run until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print one JSON object per message")
    p.add_argument(
        "--timeout", type=float, default=None,
        help="give up when no message arrives for S seconds (default: wait forever)",
    )
    p.add_argument("--curve-server", default=None, metavar="server.key", help="CURVE: the publisher's public key file")
    p.add_argument("--curve-client", default=None, metavar="NAME.key_secret", help="CURVE: this client's keypair file")


def _line(msg: MaskMessage, gap: int) -> str:
    inst = " ".join(
        f"#{i.id}:c{i.cls}[{i.bbox[0]},{i.bbox[1]},{i.bbox[2]},{i.bbox[3]}]{i.area}px" for i in msg.instances[:8]
    )
    more = f" +{len(msg.instances) - 8}" if len(msg.instances) > 8 else ""
    gap_s = f"  GAP {gap} missed" if gap else ""
    return (
        f"seq {msg.seq:6d}  step {msg.step:6d}  t {msg.t0_us / 1e6:10.6f}-{msg.t1_us / 1e6:.6f} s  "
        f"{msg.width}x{msg.height}  mask {msg.mask_pixels:6d} px  ev {msg.n_events:6d}  "
        f"inst {len(msg.instances)}{(' ' + inst) if inst else ''}{more}  lat {msg.latency_us / 1e3:.2f} ms{gap_s}"
    )


def _json(msg: MaskMessage, gap: int) -> str:
    return json.dumps(
        {
            "seq": msg.seq,
            "step": msg.step,
            "t0_us": msg.t0_us,
            "t1_us": msg.t1_us,
            "width": msg.width,
            "height": msg.height,
            "mask_pixels": msg.mask_pixels,
            "n_events": msg.n_events,
            "instances": [{"id": i.id, "class": i.cls, "bbox": list(i.bbox), "area": i.area} for i in msg.instances],
            "latency_us": msg.latency_us,
            "source": msg.source,
            "gap": gap,
        }
    )


def main(args: argparse.Namespace) -> int:
    """Print one line (or JSON object) per message; 0 ok, 1 timeout/no data, 2 bad arguments, 130 Ctrl-C."""
    if args.count < 0:
        print(f"--count {args.count} is not allowed; use 0 (forever) or a positive number", file=sys.stderr)
        return 2
    if args.timeout is not None and args.timeout <= 0:
        print(f"--timeout {args.timeout} is not allowed; use a positive number of seconds", file=sys.stderr)
        return 2
    try:
        sub = MaskSubscriber(
            args.endpoint, args.topic, skip_invalid=True,
            curve_server_key=args.curve_server, curve_client_key=args.curve_client,
        )
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    fmt = _json if args.json else _line
    code = 0
    try:
        with sub:
            while args.count == 0 or sub.received < args.count:
                msg = sub.recv(args.timeout)
                if msg is None:
                    print(
                        f"no message for {args.timeout:g} s on {args.endpoint} topic {args.topic!r}; "
                        "is the publisher running (run.py ... --sink zmq)?",
                        file=sys.stderr,
                    )
                    code = 1 if (args.count or sub.received == 0) else 0
                    break
                print(fmt(msg, sub.last_gap), flush=True)
    except KeyboardInterrupt:
        code = 130
    print(
        f"received {sub.received} message(s); {sub.missed} missed in {sub.gaps} gap(s); {sub.rejected} rejected",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m sinks.subscriber", description="print masks from a mask.v1 topic")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
