"""Live events from a DV network stream (``dv.io.NetworkReader``): TCP or a UNIX socket.

Spec forms: ``tcp://HOST:PORT``, ``unix:PATH`` (also ``net:tcp://...`` / ``net:unix:...``).
The registry splits ``NAME:ARG`` at the first colon, so ``tcp://h:p`` looks like name
``tcp`` and ``unix:/x.sock`` like name ``unix``.  Decision: one entry, ``net``, with a
``matches`` predicate for ``tcp://`` and ``unix:``.  ``registry.resolve`` tries the
explicit name first; as no source is called ``tcp`` or ``unix`` it falls through to the
predicates and hands the *whole* spec to our factory, so both forms work (and
``net:tcp://...`` too).  The alternative, extra entries named ``tcp`` and ``unix``,
would show three near-identical lines in ``--help`` for one source.

Why a child process: ``NetworkReader``'s constructor blocks *holding the GIL* (10 s on
an unreachable host here; forever on a server that accepts but never speaks), so a
thread with a timeout cannot guard it.  The dv calls run in the reader child of
``sources/aedat4.py``; this node waits for its header up to ``connect_timeout_s`` and
then polls the pipe in ``poll_ms`` slices, checking ``ctx.stop``.

When the stream is quiet the node sends empty packets with ``t_end_us`` advanced by the
wall time since the last event (mapped to sensor time), never going backwards, so the
binner closes bins on the wall clock.  The server closing ends the run cleanly with a
log message.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from stream.config import Config, section
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, StreamReset
from stream.node import NodeError, RunContext, SourceNode, UsageError
from stream.registry import register_source

from .aedat4 import ChildReader, InProcessReader, open_reader

log = logging.getLogger(__name__)


@section("network")
@dataclass(frozen=True)
class NetworkConfig:
    """``connect_timeout_s``: how long to wait for the server's stream header.
    ``poll_ms``: how often the quiet stream is checked (and an empty progress packet sent).
    ``isolate``: run dv-processing in a child process (see the module doc)."""

    connect_timeout_s: float = 5.0
    poll_ms: float = 2.0
    isolate: bool = True

    def __post_init__(self) -> None:
        if not 0.1 <= self.connect_timeout_s <= 120:
            raise ValueError(f"connect_timeout_s {self.connect_timeout_s} out of range; allowed 0.1..120")
        if not 0.5 <= self.poll_ms <= 100:
            raise ValueError(f"poll_ms {self.poll_ms} out of range; allowed 0.5..100")


def normalize_target(spec: str) -> str:
    """``tcp://HOST:PORT`` or ``unix:PATH`` from any accepted spelling; UsageError otherwise."""
    s = spec[len("net:") :] if spec.startswith("net:") else spec
    if s.startswith("tcp://"):
        host, sep, port = s[len("tcp://") :].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"bad network source {spec!r}; use tcp://HOST:PORT with a port 1..65535")
        return s
    if s.startswith("unix:") and len(s) > len("unix:"):
        return s
    raise UsageError(f"bad network source {spec!r}; use tcp://HOST:PORT or unix:/path/to/socket")


def is_network_spec(spec: str) -> bool:
    return spec.startswith(("tcp://", "unix:", "net:"))


class NetworkSource(SourceNode):
    """Events from a DV ``NetworkWriter`` (DV GUI output or dv-processing)."""

    name = "net"
    live = True

    def __init__(self, target: str, cfg: NetworkConfig) -> None:
        self.target = normalize_target(target)
        self.cfg = cfg
        self._size: SensorSize | None = None
        self._reader: ChildReader | InProcessReader | None = None
        self._ctx: RunContext | None = None
        self.end_message = ""

    @property
    def size(self) -> SensorSize:
        if self._size is None:
            raise NodeError("network source: size is known only after open(); call open(ctx) first")
        return self._size

    def describe(self) -> str:
        return self.target

    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._reader = open_reader({"kind": "net", "target": self.target, "poll_ms": self.cfg.poll_ms}, self.cfg.isolate)
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while True:
            msg = self._reader.recv(0.05)
            if msg is not None:
                break
            if ctx.stop.is_set():
                self.close()
                raise NodeError(f"stopped while connecting to {self.target}")
            if time.monotonic() >= deadline:
                self.close()
                raise NodeError(
                    f"cannot connect to {self.target}: no stream within {self.cfg.connect_timeout_s:g} s "
                    "(host unreachable, or the server does not speak DV); is DV (or a NetworkWriter) streaming there?"
                )
        kind, payload = msg
        if kind == "error":
            self.close()
            raise NodeError(str(payload))
        if kind != "meta":
            self.close()
            raise NodeError(f"cannot connect to {self.target}: the server closed before sending a stream header")
        self._size = SensorSize(payload["width"], payload["height"])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def packets(self) -> Iterator[EventPacket | StreamReset]:
        if self._reader is None or self._ctx is None:
            raise NodeError("network source: packets() before open(); the engine must open the source first")
        stop = self._ctx.stop
        size = self.size
        poll_s = self.cfg.poll_ms / 1000.0
        last_t: int | None = None  # last event timestamp (sensor µs)
        last_wall = 0.0  # wall time when it arrived
        t_end_sent = -(2**62)
        n = 0
        while not stop.is_set():
            msg = self._reader.recv(poll_s)
            if msg is None:
                # quiet: promise completeness up to the sensor time the wall clock says
                if last_t is not None:
                    t_end = last_t + 1 + int((time.monotonic() - last_wall) * 1e6)
                    if t_end > t_end_sent:
                        t_end_sent = t_end
                        yield EventPacket(np.zeros(0, EVENT_DTYPE), size, t_end)
                continue
            kind, payload = msg
            if kind == "events":
                ev: np.ndarray = payload
                if not len(ev):
                    continue
                last_t, last_wall = int(ev["timestamp"][-1]), time.monotonic()
                n += len(ev)
                t_end_sent = max(t_end_sent, last_t + 1)
                yield EventPacket(ev, size, t_end_sent)
            elif kind == "done":
                self.end_message = (payload or {}).get("msg") or f"server {self.target} closed the stream"
                log.info("%s after %d events; ending the run", self.end_message, n)
                return
            elif kind == "error":
                # the reader died mid-stream: a closed connection, not a user error
                self.end_message = f"stream {self.target} ended: {payload}"
                log.info("%s after %d events; ending the run", self.end_message, n)
                return


def make_network_source(arg: str | None, cfg: Config) -> NetworkSource:
    if not arg:
        raise UsageError("network source needs an address: tcp://HOST:PORT or unix:/path/to/socket")
    return NetworkSource(arg, cfg["network"])


@register_source(
    "net",
    "live events from DV over the network (dv.io.NetworkReader)",
    "tcp://127.0.0.1:7777 or unix:/tmp/dv.sock",
    matches=is_network_spec,
)
def _net(arg: str | None, cfg: Config) -> NetworkSource:
    return make_network_source(arg, cfg)
