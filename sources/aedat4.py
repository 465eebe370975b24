"""Replay ``.aedat4`` recordings (a file, a directory or a glob) through dv-processing.

Reading
-------
Events come from ``dv.io.MonoCameraRecording.getNextEventBatch()`` one stored packet
at a time, so memory is bounded by the largest packet, never by the file.  Time ranges
(``start_s``/``end_s``, relative to the file's first event) are cut with
``EventStore.sliceTime`` on each batch; reading stops at the first batch past the end.

Why a child process (``replay.isolate``, default on)
----------------------------------------------------
dv-processing 2.0.4 has no checksums on packets.  Measured on files written by
``MonoCameraWriter`` with one flipped bit (30 random positions): 22 decoded *garbage*
silently, 7 made ``getNextEventBatch()`` spin forever **holding the GIL** (no other
Python thread runs, Ctrl-C is never handled), 1 was harmless.  Truncated files raise
``RuntimeError`` at open (the index table is at the end).  A hang that holds the GIL
cannot be guarded from a thread, so the dv calls run in a small child process
(``python`` + numpy + dv only; it loads this file by path and never imports torch) that
ships raw event bytes over a pipe.  The parent waits with a timeout
(``replay.read_timeout_s``): a stalled child is killed and the run ends with a message
saying how many events were read.  Cost: ~0.3 s start-up per file and one memcpy per
event (measured throughput in the report).  ``isolate: false`` reads in-process for
trusted files.  Garbage that stays inside the sensor and in time order cannot be
detected (no checksums); events outside the sensor or going back in time are reported
as a corrupt file (``NodeError``) instead of being binned.

The same child machinery serves ``sources/network.py`` (``dv.io.NetworkReader``'s
constructor also blocks holding the GIL, e.g. for 10 s on an unreachable host).

Wire format parent <- child (private, versionless: both ends are this file):
``kind`` (1 byte) + ``length`` (uint64 LE) + payload; kinds ``M`` meta (JSON), ``E``
events (raw :data:`EVENT_DTYPE` bytes), ``W`` loop wrap, ``D`` done (JSON), ``X`` error
(JSON ``{"msg": ...}``).

Pacing
------
With ``realtime: true`` the packet whose events end at sensor time ``t`` is emitted at
wall time ``w0 + (t - t0) / speed`` where ``t0``/``w0`` are the first event / wall time
of the current segment (file or loop pass).  Batches are split into <= 1 ms of sensor
time so pacing is smooth, and while waiting through a gap the source emits empty
packets whose ``t_end_us = t0 + (now - w0) * speed`` (capped below the next event), so
bins close on the wall clock like a live camera.  Unpaced replay runs as fast as the
consumer takes it and drops nothing.  Every non-empty packet from a file has
``t_end_us = last timestamp + 1``.
"""
from __future__ import annotations

import glob as globmod
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stream.clock import Clock, WallClock
from stream.config import Config, section
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, StreamReset
from stream.node import NodeError, RunContext, SourceNode, UsageError
from stream.registry import register_source

log = logging.getLogger(__name__)

#: Sensor time per yielded packet when paced (µs).
PACED_SPLIT_US = 1000
#: While paced and waiting through a gap, an empty progress packet at least this often (s, wall).
PACED_TICK_S = 0.002
_HDR = struct.Struct("<cQ")
_ROOT = Path(__file__).resolve().parent.parent


@section("replay")
@dataclass(frozen=True)
class ReplayConfig:
    """File replay.

    ``realtime``: pace on sensor timestamps (``live`` source) instead of as fast as possible.
    ``speed``: pacing factor, 0.25..100 (2 = twice as fast as recorded).
    ``start_s``/``end_s``: time range in seconds relative to the file's first event.
    ``loop``: replay forever; a ``StreamReset("loop wrap")`` marks each wrap.
    ``progress``: tqdm bar on stderr for unpaced replay (only when stderr is a TTY).
    ``isolate``: read through dv-processing in a child process (guards against dv
    hanging on corrupt files; see the module doc).  ``read_timeout_s``: how long a read
    may stall before the file is declared corrupt (isolated reads only).
    """

    realtime: bool = False
    speed: float = 1.0
    start_s: float | None = None
    end_s: float | None = None
    loop: bool = False
    progress: bool = True
    isolate: bool = True
    read_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.25 <= self.speed <= 100.0:
            raise ValueError(f"speed {self.speed} out of range; allowed 0.25..100")
        if self.start_s is not None and self.start_s < 0:
            raise ValueError(f"start_s {self.start_s} is negative; use seconds >= 0 from the first event")
        if self.end_s is not None and self.end_s <= 0:
            raise ValueError(f"end_s {self.end_s} must be > 0 seconds from the first event")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s {self.end_s} must be greater than start_s {self.start_s}")
        if not 0.1 <= self.read_timeout_s <= 600:
            raise ValueError(f"read_timeout_s {self.read_timeout_s} out of range; allowed 0.1..600")


# ---------------------------------------------------------------------------------------
# dv-processing side: generators that run in the child (or in-process).  They import dv
# lazily so that importing this module stays cheap.
# ---------------------------------------------------------------------------------------


def dv_error_text(err: BaseException, limit: int = 160) -> str:
    """dv-processing's exception text cut to one line.

    Its messages carry the C++ source location, a demangled signature and a stack
    trace; the useful part is the last line before ``Stacktrace:``, after the last
    ``: `` that follows a template.
    """
    text = str(err).split("Stacktrace:", 1)[0].strip()
    line = text.splitlines()[-1].strip() if text else type(err).__name__
    for sep in ("> >: ", "]()"):
        if sep in line:
            line = line.rsplit(sep, 1)[-1].strip()
    line = line.replace("Error info: ", "").strip(" :")
    return (line[: limit - 3] + "...") if len(line) > limit else (line or type(err).__name__)


def file_batches(
    path: str, start_s: float | None, end_s: float | None, loop: bool
) -> Iterator[tuple[str, Any]]:
    """Read one recording: yields ``("meta", dict)``, then ``("events", ndarray)`` and
    ``("wrap", None)`` items.  Raises ``RuntimeError`` with a one-line message on content
    problems (not AEDAT4, truncated, no event stream).

    ``meta``: ``width``, ``height``, ``t_first`` (first event in the range, µs or None
    when there is none), ``t_last`` (recording end, µs).  The first non-empty batch is
    read before ``meta`` is sent so that ``t_first`` is the first *event*.
    """
    import dv_processing as dv

    try:
        rec = dv.io.MonoCameraRecording(str(path))
    except RuntimeError as e:
        raise RuntimeError(f"cannot open {path} as AEDAT4: {dv_error_text(e)}") from None
    if not rec.isEventStreamAvailable():
        names = ", ".join(rec.getStreamNames()) or "none"
        raise RuntimeError(f"{path} has no event stream (streams: {names}); record events, or pick another file")
    res = rec.getEventResolution()
    if res is None:
        raise RuntimeError(f"{path}: the event stream declares no resolution; the file is not a camera recording")
    t_lo, t_hi = rec.getTimeRange()

    def batches() -> Iterator[Any]:
        while True:
            b = rec.getNextEventBatch()
            if b is None:
                return
            if b.size():
                yield b

    it = batches()
    first = next(it, None)
    t0 = int(first.getLowestTime()) if first is not None else None
    lo = None if (t0 is None or start_s is None) else t0 + int(round(start_s * 1e6))
    hi = None if (t0 is None or end_s is None) else t0 + int(round(end_s * 1e6))

    def cut(b: Any) -> Any:
        if lo is None and hi is None:
            return b
        # sliceTime(start, end): start inclusive, end exclusive; shallow views.
        return b.sliceTime(lo if lo is not None else int(b.getLowestTime()), hi if hi is not None else int(b.getHighestTime()) + 1)

    # skip the batches wholly before the range (sequential read: no seeking in 2.0.4's
    # MonoCameraRecording without loading a whole time range into memory)
    b = first
    while b is not None and lo is not None and int(b.getHighestTime()) < lo:
        b = next(it, None)
    t_first = None
    if b is not None and (hi is None or int(b.getLowestTime()) < hi):
        s = cut(b)
        t_first = int(s.getLowestTime()) if s.size() else None
    yield "meta", {
        "width": int(res[0]),
        "height": int(res[1]),
        "t_first": t_first,
        "t_lo": t0,
        "t_last": int(t_hi) if t0 is not None else None,
    }
    if t_first is None:
        return
    while True:
        while b is not None:
            if hi is not None and int(b.getLowestTime()) >= hi:
                break
            if lo is None or int(b.getHighestTime()) >= lo:
                s = cut(b)
                if s.size():
                    yield "events", s.numpy()
            b = next(it, None)
        if not loop:
            return
        rec.resetSequentialRead()
        yield "wrap", None
        it = batches()
        b = next(it, None)


def net_batches(target: str, poll_ms: float) -> Iterator[tuple[str, Any]]:
    """Read a DV network stream: ``("meta", {width, height})``, then ``("events", arr)``
    until the server closes (``("done", {"msg": ...})``).

    ``target`` is ``tcp://HOST:PORT`` or ``unix:PATH``.  ``getNextEventBatch()`` returns
    None when nothing is new; this loop then sleeps ``poll_ms`` (it runs in its own
    process, so a sleep costs no one a core).
    """
    import dv_processing as dv

    try:
        if target.startswith("unix:"):
            reader = dv.io.NetworkReader(dv.Path(target[len("unix:") :]))
        else:
            host, _, port = target[len("tcp://") :].rpartition(":")
            reader = dv.io.NetworkReader(host.strip("[]"), int(port))
    except RuntimeError as e:
        raise RuntimeError(f"cannot connect to {target}: {_net_reason(e)}; is DV (or a NetworkWriter) streaming there?") from None
    if not reader.isEventStreamAvailable():
        raise RuntimeError(f"the stream at {target} carries no events (a frame/IMU stream?); connect to an event output")
    res = reader.getEventResolution()
    if res is None:
        raise RuntimeError(f"the event stream at {target} declares no resolution; is it a camera output?")
    yield "meta", {"width": int(res[0]), "height": int(res[1])}
    while True:
        try:
            b = reader.getNextEventBatch()
        except RuntimeError as e:
            yield "done", {"msg": f"server {target} closed the stream ({dv_error_text(e, 80)})"}
            return
        if b is None:
            if not reader.isRunning():
                yield "done", {"msg": f"server {target} closed the stream"}
                return
            time.sleep(poll_ms / 1000.0)
            continue
        if b.size():
            yield "events", b.numpy()


def _net_reason(e: BaseException) -> str:
    text = str(e)
    for key, reason in (
        ("Connection refused", "connection refused"),
        ("No such file or directory", "no such socket file"),
        ("Connection reset", "connection reset by peer"),
        ("Network is unreachable", "network unreachable"),
        ("Host is unreachable", "host unreachable"),
        ("Permission denied", "permission denied"),
    ):
        if key in text:
            return reason
    return dv_error_text(e, 100)


def _child_main() -> None:
    """Entry point of the reader child: ``argv[1]`` JSON job, ``argv[2]`` pipe fd."""
    job = json.loads(sys.argv[1])
    fd = int(sys.argv[2])
    out = os.fdopen(fd, "wb", buffering=0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop

    def send(kind: bytes, payload: bytes | memoryview) -> None:
        out.write(_HDR.pack(kind, len(payload)))
        view = memoryview(payload).cast("B")
        while view.nbytes:  # unbuffered pipe writes may be partial
            n = out.write(view)
            view = view[n:]

    try:
        if job["kind"] == "file":
            gen = file_batches(job["path"], job.get("start_s"), job.get("end_s"), bool(job.get("loop")))
        else:
            gen = net_batches(job["target"], float(job.get("poll_ms", 2.0)))
        for kind, payload in gen:
            if kind == "events":
                send(b"E", np.ascontiguousarray(payload).view(np.uint8))
            elif kind == "wrap":
                send(b"W", b"")
            else:
                send(b"M" if kind == "meta" else b"D", json.dumps(payload).encode())
        send(b"D", b"{}")
    except BrokenPipeError:
        return  # parent went away: nothing to report to
    except RuntimeError as e:  # dv-processing's errors, already one line from the generators
        send(b"X", json.dumps({"msg": dv_error_text(e, 300)}).encode())


# ---------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------


class ReaderStalled(Exception):
    """The child produced nothing within the timeout (dv-processing hung)."""


class ChildReader:
    """Runs :func:`file_batches` / :func:`net_batches` in a child process.

    ``recv(timeout)`` returns ``(kind, payload)`` with kinds ``meta``, ``events``,
    ``wrap``, ``done``, ``error``; or None when ``timeout`` passed with nothing complete.
    Raises :class:`ReaderStalled` only via :meth:`recv_within`.
    """

    def __init__(self, job: dict[str, Any]) -> None:
        r, w = os.pipe()
        try:  # bigger pipe: fewer wake-ups at tens of Mev/s (Linux only; 64 KiB otherwise)
            import fcntl

            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except (ImportError, OSError) as e:  # not Linux or over /proc/sys/fs/pipe-max-size
            log.debug("pipe size unchanged: %s", e)
        code = (
            "import importlib.util as u, sys;"
            f"s=u.spec_from_file_location('_spikestream_dvchild', {str(Path(__file__).resolve())!r});"
            "m=u.module_from_spec(s); sys.modules[s.name]=m; s.loader.exec_module(m); m._child_main()"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(job), str(w)],
                pass_fds=(w,),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(w)
        self._fd = r
        # The message being received: header fields, its destination buffer and how many
        # payload bytes are in.  Payloads are read straight into their destination (the
        # events' own array): one copy from the pipe, where reading into a bytearray and
        # then copying out cost two (recv: 124 -> ~60 ms per 4 M events, measured).
        self._hdr = bytearray()
        self._msg: tuple[bytes, int, Any, memoryview] | None = None
        self._got = 0
        self.closed = False

    def _read_into(self, view: memoryview, deadline: float | None) -> int:
        """Read what is available into ``view`` (0 on timeout); EOFError on EOF."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return 0
        n = os.readv(self._fd, [view])
        if n == 0:
            raise EOFError
        return n

    def recv(self, timeout: float | None) -> tuple[str, Any] | None:
        """Next complete message, or None after ``timeout`` seconds (None: wait forever).

        A message cut by the timeout is kept and completed by the next call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._msg is None:
                # header bytes only (9): the payload then goes to its own buffer
                need = _HDR.size - len(self._hdr)
                part = bytearray(need)
                n = self._read_into(memoryview(part), deadline)
                if n == 0:
                    return None
                self._hdr += part[:n]
                if len(self._hdr) == _HDR.size:
                    kind, length = _HDR.unpack(self._hdr)
                    self._hdr = bytearray()
                    if kind == b"E":
                        if length % EVENT_DTYPE.itemsize:  # the child sends whole events only
                            return "error", f"reader process sent {length} bytes of events, not whole events (a bug)"
                        dest: Any = np.empty(length // EVENT_DTYPE.itemsize, dtype=EVENT_DTYPE)
                        view = memoryview(dest.view(np.uint8))
                    else:
                        dest = bytearray(length)
                        view = memoryview(dest)
                    self._msg, self._got = (kind, length, dest, view), 0
            kind, length, dest, view = self._msg
            # once a header is in, the payload follows at pipe speed: the deadline still applies
            while self._got < length:
                n = self._read_into(view[self._got :], deadline)
                if n == 0:
                    return None
                self._got += n
        except EOFError:
            code = self.proc.wait()
            return "error", f"reader process ended unexpectedly (exit code {code})"
        self._msg = None
        if kind == b"E":
            return "events", dest
        if kind == b"W":
            return "wrap", None
        data = json.loads(bytes(dest) or b"{}")
        if kind == b"M":
            return "meta", data
        if kind == b"D":
            return "done", data
        return "error", data.get("msg", "unknown reader error")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self._fd)  # a writing child gets EPIPE and exits
        if self.proc.poll() is None:
            self.proc.kill()  # it may be spinning inside dv-processing: no polite way out
        self.proc.wait()


class InProcessReader:
    """Same interface as :class:`ChildReader`, calling dv-processing in this thread."""

    def __init__(self, job: dict[str, Any]) -> None:
        if job["kind"] == "file":
            self._gen = file_batches(job["path"], job.get("start_s"), job.get("end_s"), bool(job.get("loop")))
        else:
            self._gen = net_batches(job["target"], float(job.get("poll_ms", 2.0)))
        self.closed = False

    def recv(self, timeout: float | None) -> tuple[str, Any] | None:
        try:
            return next(self._gen)
        except StopIteration:
            return "done", {}
        except RuntimeError as e:
            return "error", dv_error_text(e, 300)

    def close(self) -> None:
        self.closed = True
        self._gen.close()


def open_reader(job: dict[str, Any], isolate: bool) -> ChildReader | InProcessReader:
    return ChildReader(job) if isolate else InProcessReader(job)


# ---------------------------------------------------------------------------------------
# the source node
# ---------------------------------------------------------------------------------------


def is_replay_spec(spec: str) -> bool:
    """``matches`` predicate: ``*.aedat4`` paths, existing directories, globs."""
    return spec.lower().endswith(".aedat4") or any(c in spec for c in "*?[") or Path(spec).is_dir()


def resolve_files(spec: str) -> list[Path]:
    """The recordings ``spec`` names, sorted; UsageError when there are none."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globmod.glob(spec, recursive=True) if p.lower().endswith(".aedat4"))
        if not files:
            raise UsageError(f"glob {spec!r} matches no .aedat4 file; check the pattern (quote it in the shell)")
        return files
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() == ".aedat4" and q.is_file())
        if not files:
            raise UsageError(f"directory {p} holds no .aedat4 file; point --source at a recording or a folder of them")
        return files
    if not p.exists():
        raise UsageError(f"recording {p} not found; pass an existing .aedat4 file, a directory or a glob")
    if not p.is_file():
        raise UsageError(f"{p} is not a regular file; pass a .aedat4 recording")
    return [p]


def _split_points(t: np.ndarray, step_us: int) -> np.ndarray:
    """Indices cutting sorted timestamps ``t`` into runs of at most ``step_us`` µs."""
    edges = np.arange(int(t[0]) + step_us, int(t[-1]) + 1, step_us, dtype=np.int64)
    return np.unique(np.searchsorted(t, edges, side="left"))


class Aedat4Source(SourceNode):
    """Replays one or more ``.aedat4`` files (see the module doc for pacing and isolation)."""

    name = "file"

    def __init__(self, spec: str, cfg: ReplayConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.spec = spec
        self.files = resolve_files(spec)
        self.clock: Clock = clock or WallClock()
        self.live = bool(cfg.realtime)
        self._size: SensorSize | None = None
        self._reader: ChildReader | InProcessReader | None = None
        self._first_meta: dict[str, Any] | None = None
        self._ctx: RunContext | None = None
        self.n_events = 0  # events yielded (all files, all passes)

    @property
    def size(self) -> SensorSize:
        if self._size is None:
            raise NodeError("file source: size is known only after open(); call open(ctx) first")
        return self._size

    def describe(self) -> str:
        return self.files[0].name if len(self.files) == 1 else f"{self.spec} ({len(self.files)} files)"

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._reader, meta = self._start(self.files[0], single_loop=self.cfg.loop and len(self.files) == 1)
        self._first_meta = meta
        self._size = SensorSize(meta["width"], meta["height"])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _start(self, path: Path, single_loop: bool) -> tuple[ChildReader | InProcessReader, dict[str, Any]]:
        job = {"kind": "file", "path": str(path), "start_s": self.cfg.start_s, "end_s": self.cfg.end_s, "loop": single_loop}
        reader = open_reader(job, self.cfg.isolate)
        try:
            msg = self._recv(reader, path, 0)
            if msg[0] != "meta":
                raise NodeError(f"{path}: reader sent {msg[0]} before the file header; the file is unreadable")
            return reader, msg[1]
        except BaseException:
            reader.close()
            raise

    def _recv(self, reader: ChildReader | InProcessReader, path: Path, n_read: int) -> tuple[str, Any]:
        """Next message; NodeError on read errors and stalls (with the count read so far)."""
        stop = self._ctx.stop if self._ctx is not None else None
        waited = 0.0
        # wait in short slices so that a stop request is seen; the stall budget is total
        while True:
            msg = reader.recv(0.1 if isinstance(reader, ChildReader) else None)
            if msg is not None:
                break
            if stop is not None and stop.is_set():
                return "done", {}
            waited += 0.1
            if waited >= self.cfg.read_timeout_s:
                reader.close()
                raise NodeError(
                    f"reading {path} stalled after {n_read} events (no data for {self.cfg.read_timeout_s:g} s; "
                    "dv-processing hangs on corrupt packets); the file is corrupt: re-export or trim it"
                )
        if msg[0] == "error":
            raise NodeError(f"{msg[1]} (after {n_read} events)" if n_read else msg[1])
        return msg

    # -- the stream ------------------------------------------------------------------------
    def packets(self) -> Iterator[EventPacket | StreamReset]:
        if self._reader is None or self._first_meta is None:
            raise NodeError("file source: packets() before open(); the engine must open the source first")
        stop = self._ctx.stop if self._ctx is not None else None
        pass_no = 0
        while True:
            events_this_pass = 0
            for i, path in enumerate(self.files):
                if stop is not None and stop.is_set():
                    return
                if pass_no == 0 and i == 0:
                    reader, meta = self._reader, self._first_meta
                else:
                    self.close()
                    reader, meta = self._start(path, single_loop=False)
                    self._reader = reader
                    size = SensorSize(meta["width"], meta["height"])
                    reason = "loop wrap" if i == 0 else f"next file: {path.name}"
                    yield StreamReset(reason, size=size, source=self.describe())
                n = yield from self._play(reader, meta, path)
                events_this_pass += n
            if not self.cfg.loop:
                return
            if len(self.files) == 1:  # the child looped; it ends only when there was nothing to play
                if events_this_pass == 0:
                    raise NodeError(f"nothing to loop over: {self.spec} has no events in the selected range")
                return
            pass_no += 1
            if events_this_pass == 0:
                raise NodeError(f"nothing to loop over: {self.spec} has no events in the selected range")

    def _play(self, reader: ChildReader | InProcessReader, meta: dict[str, Any], path: Path) -> Iterator[EventPacket | StreamReset]:
        """Yield one file's packets (all loop passes when the child loops); return the count."""
        size = SensorSize(meta["width"], meta["height"])
        stop = self._ctx.stop if self._ctx is not None else None
        paced = self.cfg.realtime
        bar = self._progress_bar(meta, path) if not paced else None
        bar_t = int(meta["t_first"]) if meta.get("t_first") is not None else 0
        n_file = 0
        last_t: int | None = None
        seg_t0: int | None = None  # pacing reference: first event of the segment
        seg_w0 = 0.0
        try:
            while not (stop is not None and stop.is_set()):
                kind, payload = self._recv(reader, path, n_file)
                if kind == "done":
                    return n_file
                if kind == "wrap":
                    if n_file == 0:
                        raise NodeError(f"nothing to loop over: {path} has no events in the selected range")
                    last_t, seg_t0 = None, None
                    yield StreamReset("loop wrap", size=size, source=self.describe())
                    continue
                if kind != "events":
                    continue
                ev: np.ndarray = payload
                if not len(ev):
                    continue
                self._check(ev, size, path, n_file, last_t)
                if bar is not None:
                    t_bar = int(ev["timestamp"][-1])
                    bar.update((t_bar - bar_t) / 1e6)
                    bar_t = t_bar
                if not paced:
                    n_file += len(ev)
                    self.n_events += len(ev)
                    last_t = int(ev["timestamp"][-1])
                    yield EventPacket(ev, size, last_t + 1)
                    continue
                if seg_t0 is None:
                    seg_t0, seg_w0 = int(ev["timestamp"][0]), self.clock.now()
                cuts = _split_points(ev["timestamp"], PACED_SPLIT_US)
                for chunk in np.split(ev, cuts):
                    if not len(chunk):
                        continue
                    t_hi = int(chunk["timestamp"][-1])
                    due = seg_w0 + (t_hi - seg_t0) / (1e6 * self.cfg.speed)
                    # wait, sending progress packets through gaps so bins close on time
                    first_t = int(chunk["timestamp"][0])
                    while self.clock.now() < due:
                        if stop is not None and stop.is_set():
                            return n_file
                        self.clock.sleep_until(min(due, self.clock.now() + PACED_TICK_S), stop)
                        t_now = seg_t0 + int((self.clock.now() - seg_w0) * 1e6 * self.cfg.speed)
                        t_end = min(t_now, first_t)
                        if last_t is not None and t_end > last_t + 1 and self.clock.now() < due:
                            yield EventPacket(np.zeros(0, EVENT_DTYPE), size, t_end)
                    n_file += len(chunk)
                    self.n_events += len(chunk)
                    last_t = t_hi
                    yield EventPacket(chunk, size, t_hi + 1)
        finally:
            if bar is not None:
                bar.close()
        return n_file

    def _check(self, ev: np.ndarray, size: SensorSize, path: Path, n_read: int, last_t: int | None) -> None:
        """Reject what can only be a corrupt decode: events outside the sensor, time going back."""
        # One compiled pass (the binner's scan) instead of six numpy reductions over strided
        # fields (75 -> ~15 µs per 20,000 events).  Imported here, not at the top: the reader
        # child loads this file and must not import torch (stream.binner does).
        from stream.binner import scan_events

        n_out, n_back, _ = scan_events(ev, size, np.iinfo(np.int64).min if last_t is None else last_t)
        if n_out:
            raise NodeError(
                f"{path} is corrupt: event outside the {size} sensor after {n_read} good events "
                "(dv-processing decoded garbage); re-export or trim the file"
            )
        # with every event on the sensor, "earlier than a kept event" = "time goes backwards"
        if n_back:
            raise NodeError(
                f"{path} is corrupt: timestamps go backwards after {n_read} good events; re-export or trim the file"
            )

    def _progress_bar(self, meta: dict[str, Any], path: Path) -> Any:
        if not self.cfg.progress or not sys.stderr.isatty() or meta.get("t_first") is None:
            return None
        from tqdm import tqdm

        t0, t1 = int(meta["t_first"]), int(meta["t_last"])
        if self.cfg.end_s is not None:
            t1 = min(t1, int(meta["t_lo"]) + int(self.cfg.end_s * 1e6))
        return tqdm(
            total=max(t1 - t0, 1) / 1e6,
            desc=path.name,
            file=sys.stderr,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} s of sensor time [{elapsed}<{remaining}]",
        )


@register_source(
    "file",
    "replay .aedat4 recordings (a file, a directory or a glob)",
    "recording.aedat4 or 'recs/*.aedat4'",
    matches=is_replay_spec,
)
def make_file_source(arg: str | None, cfg: Config) -> Aedat4Source:
    if not arg:
        raise UsageError("--source file needs a path: file:recording.aedat4, a directory or a glob")
    return Aedat4Source(arg, cfg["replay"])
