"""Shared helpers of the reliability catalogue: run the real CLI, read outputs back, sample RSS.

Every subprocess here has a timeout; waits are on conditions (a line on a pipe, a file, a
socket) with a deadline, never a bare sleep.
"""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

#: A small, quiet configuration: 64x48 synthetic sensor, no status line.
SMALL: dict[str, Any] = {
    "synthetic": {"width": 64, "height": 48},
    "engine": {"status_s": 0},
}


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]

    def one_error(self) -> str:
        """The single ``error:`` line; fails the test when there is none, several, or a traceback."""
        lines = self.error_lines
        if "Traceback" in self.stderr or len(lines) != 1:
            raise AssertionError(f"expected exactly one 'error:' line and no traceback, got rc={self.rc}:\n{self.stderr}")
        return lines[0]


def write_cfg(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def small_cfg(tmp: Path, **sections: dict[str, Any]) -> Path:
    """``SMALL`` with ``sections`` merged in, written to ``tmp/small.yaml``."""
    data = {k: dict(v) for k, v in SMALL.items()}
    for name, sec in sections.items():
        data.setdefault(name, {}).update(sec)
    return write_cfg(tmp / "small.yaml", data)


def cli_args(args: list[str], tmp: Path) -> list[str]:
    return [PY, str(ROOT / "run.py"), "-q", "--output", str(tmp / "runs"), *args]


def cli(args: list[str], tmp: Path, timeout: float = 90.0, env: dict[str, str] | None = None) -> Result:
    """Run ``run.py -q --output TMP/runs ARGS`` to the end (killed after ``timeout``: a hang fails)."""
    t0 = time.monotonic()
    p = subprocess.run(
        cli_args(args, tmp), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


class Proc:
    """A ``run.py`` child whose stderr is read line by line while it runs."""

    def __init__(self, args: list[str], tmp: Path, raw: bool = False) -> None:
        cmd = args if raw else cli_args(args, tmp)
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.p.stderr is not None
        os.set_blocking(self.p.stderr.fileno(), False)
        self._sel.register(self.p.stderr, selectors.EVENT_READ)

    def _pump(self, timeout: float) -> bool:
        """Read what stderr has within ``timeout``; False at EOF."""
        assert self.p.stderr is not None
        if not self._sel.select(timeout):
            return True
        chunk = self.p.stderr.read()
        if chunk is None:  # spurious wake-up: nothing to read yet
            return True
        if not chunk:
            return False
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        self.lines += [d.decode(errors="replace") for d in done]
        return True

    def wait_line(self, needle: str, timeout: float) -> str:
        """The first stderr line containing ``needle``; AssertionError after ``timeout`` or at exit."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ln in self.lines[seen:]:
                if needle in ln:
                    return ln
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"no line with {needle!r} within {timeout} s; stderr so far:\n" + "\n".join(self.lines))
            if not self._pump(min(left, 0.1)):
                if not any(needle in ln for ln in self.lines[seen:]):
                    raise AssertionError(f"process ended without {needle!r}; stderr:\n" + "\n".join(self.lines))

    def finish(self, timeout: float) -> Result:
        """Wait for exit (killing it after ``timeout``, which then fails the caller's rc check)."""
        t0 = time.monotonic()
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        while self._pump(0.0):
            pass
        if self._buf:
            self.lines.append(self._buf.decode(errors="replace"))
            self._buf = b""
        out = self.p.stdout.read().decode(errors="replace") if self.p.stdout else ""
        return Result(rc, out, "\n".join(self.lines), time.monotonic() - t0)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: Callable[[float], Any] | None = None) -> Any:
    """Return ``pred()`` once truthy; AssertionError naming ``what`` after ``timeout`` s.

    ``poll(dt)`` is how to wait between checks (e.g. a socket poll); default: block on a
    private Event, i.e. a timed wait that is not a sleep-then-assert.
    """
    import threading

    ev = threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        (poll or ev.wait)(0.02)


def video_frames(path: Path) -> int:
    """Frames that ``cv2.VideoCapture`` decodes from ``path`` (0 when it cannot open it)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.isOpened():
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
    finally:
        cap.release()
    return n


def aedat_counts(path: Path) -> tuple[int, int]:
    """(events, frames) that dv-processing reads back from a recording."""
    import dv_processing as dv

    rec = dv.io.MonoCameraRecording(str(path))
    n_ev = n_fr = 0
    while True:
        b = rec.getNextEventBatch()
        if b is None:
            break
        n_ev += b.size()
    if rec.isFrameStreamAvailable():
        while rec.getNextFrame() is not None:
            n_fr += 1
    return n_ev, n_fr


def rss_mb() -> float:
    """This process's resident set size in MiB (``VmRSS`` of /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
