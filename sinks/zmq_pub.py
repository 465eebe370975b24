"""``--sink zmq[:ENDPOINT]``: publish every mask on a ZeroMQ topic (schema ``mask.v1``).

Frames per message: ``[topic, payload]``, payload from :func:`sinks.wire.encode`.

Decisions:

* **XPUB, not PUB.**  An XPUB socket sends exactly like PUB but also hands us the
  subscriptions, so ``wait_ready`` can hold a file replay until ``wait_subscribers``
  subscribers joined (the "slow joiner" problem: a PUB drops everything sent before the
  subscription arrived).  ``XPUB_VERBOSER`` reports every (un)subscription, also
  duplicates, so N subscribers to the same topic count as N.
* **Never block the pipeline.**  Sends use ``NOBLOCK``.  By default ZeroMQ drops
  silently, per subscriber, once that subscriber's queue (``hwm``) is full: a slow
  subscriber loses messages, the others do not, and the publisher cannot count the loss
  (the subscriber sees it as a ``seq`` gap).  With ``nodrop: true`` (``XPUB_NODROP``) a
  full subscriber queue makes the send fail with EAGAIN instead; the message then goes
  to *no* subscriber and is counted as ``drops.zmq``.  Default off, because one stalled
  client would then starve every other client.
* **Loopback by default.**  Any other host needs an explicit endpoint and logs a
  warning: masks are not secret-free (they show where people are); use CURVE
  (``curve_dir``) off the machine.

CURVE key layout (``curve_dir``; :func:`make_curve_keys` creates it)::

    KEYDIR/server.key            server public key (give to clients)
    KEYDIR/server.key_secret     server keypair (stays on the publisher)
    KEYDIR/authorized_clients/*.key   public keys of the clients allowed to subscribe
    KEYDIR/clients/NAME.key_secret    client keypairs made by the helper (move them to the
                                      subscriber hosts; the publisher never reads them)
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from stream.config import section
from stream.events import MaskResult, StreamReset
from stream.node import NodeError, RunContext, SinkNode, UsageError
from stream.registry import register_sink

from . import wire

log = logging.getLogger("sinks.zmq")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"
_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


@section("zmq")
@dataclass(frozen=True)
class ZmqConfig:
    """Options of the ZeroMQ mask publisher.

    ``hwm``: messages queued per subscriber before ZeroMQ drops (send high-water mark).
    ``wait_subscribers``: ``wait_ready`` returns only after this many subscriptions to
    ``topic`` arrived (0 = do not wait).  ``nodrop``: see module doc.  ``linger_ms``:
    how long ``close`` may spend flushing queued messages.
    """

    endpoint: str = DEFAULT_ENDPOINT
    topic: str = "masks"
    hwm: int = 1000
    compress: bool = True
    wait_subscribers: int = 0
    curve_dir: str | None = None
    nodrop: bool = False
    linger_ms: int = 1000

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)
        if not self.topic or len(self.topic.encode()) > 255:
            raise ValueError(f"topic {self.topic!r} is not allowed; use 1..255 bytes, e.g. masks")
        if not (1 <= self.hwm <= 10_000_000):
            raise ValueError(f"hwm={self.hwm} is not allowed; use 1..10000000 (default 1000)")
        if not (0 <= self.wait_subscribers <= 10_000):
            raise ValueError(f"wait_subscribers={self.wait_subscribers} is not allowed; use 0..10000")
        if not (0 <= self.linger_ms <= 60_000):
            raise ValueError(f"linger_ms={self.linger_ms} is not allowed; use 0..60000")


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError unless ``endpoint`` is ``tcp://HOST:PORT``, ``ipc://PATH`` or ``inproc://NAME``."""
    if endpoint.startswith(("ipc://", "inproc://")) and len(endpoint.split("://", 1)[1]) > 0:
        return
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if sep and host and (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
            return
    raise ValueError(
        f"endpoint {endpoint!r} is not allowed; use tcp://HOST:PORT (e.g. {DEFAULT_ENDPOINT}), ipc://PATH or inproc://NAME"
    )


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp on 127.x / localhost / ::1."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    return host.startswith(_LOOPBACK)


# ------------------------------------------------------------------------------------ CURVE
@dataclass(frozen=True)
class CurveKeys:
    """Paths made by :func:`make_curve_keys`."""

    server_public: Path
    server_secret: Path
    authorized_dir: Path
    clients: dict[str, Path]  # name -> client .key_secret (holds public and secret key)


def make_curve_keys(keydir: str | Path, clients: Sequence[str] = ("client",)) -> CurveKeys:
    """Create the CURVE key layout in ``keydir`` (see module doc); existing files are kept.

    Each name in ``clients`` gets a keypair under ``clients/`` and its public key under
    ``authorized_clients/``.  Returns the paths.
    """
    if not zmq.has("curve"):
        raise NodeError("this libzmq was built without CURVE; install pyzmq wheels (they include libsodium)")
    root = Path(keydir)
    auth_dir, client_dir = root / "authorized_clients", root / "clients"
    for d in (root, auth_dir, client_dir):
        d.mkdir(parents=True, exist_ok=True)
    if not (root / "server.key_secret").exists():
        zmq.auth.create_certificates(str(root), "server")
    out: dict[str, Path] = {}
    for name in clients:
        if not name.isidentifier():
            raise NodeError(f"client name {name!r} is not allowed; use letters, digits and _")
        if not (client_dir / f"{name}.key_secret").exists():
            pub, _ = zmq.auth.create_certificates(str(client_dir), name)
            (auth_dir / f"{name}.key").write_bytes(Path(pub).read_bytes())
        out[name] = client_dir / f"{name}.key_secret"
    return CurveKeys(root / "server.key", root / "server.key_secret", auth_dir, out)


def _load_server_keys(curve_dir: Path) -> tuple[bytes, bytes, Path]:
    secret_file = curve_dir / "server.key_secret"
    auth_dir = curve_dir / "authorized_clients"
    if not secret_file.is_file() or not auth_dir.is_dir():
        raise NodeError(
            f"CURVE key folder {curve_dir} lacks server.key_secret or authorized_clients/; "
            "create it with sinks.zmq_pub.make_curve_keys(KEYDIR)"
        )
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as e:
        raise NodeError(f"cannot read CURVE server key {secret_file}: {e}; recreate it with make_curve_keys") from None
    if secret is None:
        raise NodeError(f"{secret_file} holds no secret key; recreate it with make_curve_keys")
    if not any(auth_dir.glob("*.key")):
        raise NodeError(f"{auth_dir} holds no client public keys (*.key); no subscriber could connect")
    return public, secret, auth_dir


# -------------------------------------------------------------------------------- publisher
class ZmqPublisher(SinkNode):
    """Publishes each :class:`MaskResult` as ``[topic, mask.v1 payload]`` on an XPUB socket."""

    name = "zmq"
    queue_policy = "block"  # every step is published; the send itself never blocks
    queue_capacity = 64

    def __init__(self, cfg: ZmqConfig) -> None:
        self.cfg = cfg
        self.topic = cfg.topic.encode()
        self.seq = 0
        self.subscribers = 0
        self.endpoint: str = cfg.endpoint  # the bound endpoint after open (port resolved)
        self._zctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth: ThreadAuthenticator | None = None
        self._ctx: RunContext | None = None
        self._lock = threading.Lock()  # wait_ready and process may run on different threads

    # -- lifecycle ---------------------------------------------------------------------
    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        try:
            self._open()
        except BaseException:
            self.close()  # the engine closes only nodes whose open() succeeded
            raise

    def _open(self) -> None:
        # One context per publisher: the CURVE authenticator is per context, and two
        # publishers in one process must not share it.
        self._zctx = zmq.Context()
        sock = self._sock = self._zctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self.cfg.hwm)
        sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        if self.cfg.nodrop:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        if self.cfg.curve_dir is not None:
            public, secret, auth_dir = _load_server_keys(Path(self.cfg.curve_dir))
            self._auth = ThreadAuthenticator(self._zctx, log=logging.getLogger("sinks.zmq.auth"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(auth_dir))
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
        try:
            sock.bind(self.cfg.endpoint)
        except zmq.ZMQError as e:
            if e.errno == errno.EADDRINUSE:
                raise NodeError(
                    f"cannot bind {self.cfg.endpoint}: address in use; "
                    f"pick another with --sink zmq:tcp://127.0.0.1:PORT"
                ) from None
            raise NodeError(
                f"cannot bind {self.cfg.endpoint}: {e.strerror}; use a local address such as {DEFAULT_ENDPOINT}"
            ) from None
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if not is_loopback(self.endpoint):
            log.warning(
                "zmq: publishing masks on %s, reachable from other machines%s",
                self.endpoint,
                "" if self.cfg.curve_dir else "; anyone on the network can subscribe (use --zmq-curve KEYDIR)",
            )

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            auth, self._auth = self._auth, None
            zctx, self._zctx = self._zctx, None
        if sock is not None:
            sock.close()  # LINGER bounds how long queued messages may still flush
        if auth is not None:
            auth.stop()
        if zctx is not None:
            zctx.term()

    # -- subscriptions -------------------------------------------------------------------
    def _poll_subscriptions(self) -> None:
        """Read pending (un)subscription messages without blocking; keep ``subscribers``."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            kind, prefix = msg[0], msg[1:]
            if not self.topic.startswith(prefix):  # a subscription to another topic
                continue
            if kind == 1:
                self.subscribers += 1
            elif kind == 0:
                self.subscribers = max(0, self.subscribers - 1)
            if self._ctx is not None:
                self._ctx.metrics.gauge("zmq.subscribers", self.subscribers)

    def wait_ready(self, stop: threading.Event) -> None:
        """Return once ``wait_subscribers`` subscriptions to the topic arrived, or ``stop`` is set."""
        n = self.cfg.wait_subscribers
        if n <= 0:
            return
        polls = 0
        while not stop.is_set():
            with self._lock:
                if self._sock is None:
                    return
                self._poll_subscriptions()
                if self.subscribers >= n:
                    return
                ready = self._sock.poll(50, zmq.POLLIN)  # 50 ms slices keep Ctrl-C responsive
            polls += 0 if ready else 1
            if polls == 10:  # say it once, after ~0.5 s, so a quick subscriber causes no noise
                log.warning("zmq: waiting for %d subscriber(s) on %s topic %r", n, self.endpoint, self.cfg.topic)

    # -- data ------------------------------------------------------------------------------
    def process(self, item: MaskResult | StreamReset) -> None:
        if not isinstance(item, MaskResult):
            return  # mask.v1 has no reset message; step indices keep counting across resets
        ctx = self._ctx
        with self._lock:
            sock = self._sock
            if sock is None:
                raise NodeError("zmq publisher used before open() or after close(); this is a bug in the caller")
            self._poll_subscriptions()
            payload = wire.encode(item, self.seq, compress=self.cfg.compress)
            try:
                sock.send_multipart([self.topic, payload], flags=zmq.NOBLOCK)
            except zmq.Again:
                if ctx is not None:
                    ctx.metrics.inc("drops.zmq")
            else:
                if ctx is not None:
                    ctx.metrics.inc("zmq.sent")
                    ctx.metrics.latency("latency.send", (time.perf_counter_ns() - item.step.closed_ns) * 1e-9)
            # seq counts every message handed to ZeroMQ, sent or refused, so that a
            # subscriber sees refused messages as gaps too.
            self.seq += 1


@register_sink("zmq", "publish masks on a ZeroMQ PUB socket (schema mask.v1)", "zmq or zmq:tcp://127.0.0.1:5557")
def make_zmq(arg: str | None, cfg: Any) -> ZmqPublisher:
    """Factory: ``zmq`` uses ``cfg.zmq``; ``zmq:ENDPOINT`` overrides its endpoint."""
    zcfg: ZmqConfig = cfg["zmq"] if cfg is not None and "zmq" in cfg else ZmqConfig()
    if arg:
        try:
            zcfg = dataclasses.replace(zcfg, endpoint=arg)
        except ValueError as e:
            raise UsageError(f"--sink zmq:{arg}: {e}") from None
    return ZmqPublisher(zcfg)
