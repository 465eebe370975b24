"""``--sink overlay[:TARGET]``: draw events, masks and instance boxes in a window, a video or PNGs.

Targets: bare ``overlay`` opens a window when a display exists (``DISPLAY`` or
``WAYLAND_DISPLAY`` set *and* OpenCV built with GUI support; opencv-python-headless has
none), else writes ``RUN_DIR/overlay.mp4`` and prints the path.  ``overlay:X.mp4``
("mp4v") and ``overlay:X.avi`` ("MJPG") write a video, ``overlay:DIR/`` PNG frames
``DIR/frame_000000.png`` ..., ``overlay:window`` insists on a window.

**Frames follow sensor time.**  Frame ``k`` of a segment covers sensor time
``[T0 + k/fps, T0 + (k+1)/fps)`` where ``T0`` is the segment's first bin start; a step
belongs to the frame holding its ``t0_us``.  At the end of a segment (a
:class:`StreamReset` or ``close``) frames are completed up to
``ceil((t1_last - T0) * fps)``, so a replay's video has a deterministic frame count
whatever the wall-clock speed.  A frame that no step starts in repeats the previous mask
(its bin is still the latest) while the events keep decaying.

**Folding masks:** the union of the folded steps' masks, later steps winning where
classes overlap, so a short-lived detection inside a frame is never hidden; instance
boxes are those of the latest step in the frame (boxes of different steps would
describe the same object twice).

**Events:** a per-pixel ON and OFF intensity; each frame multiplies it by
``exp(-(1/fps) / decay)`` and sets the pixels of the frame's events to 1.

**Queues:** the window uses ``drop_oldest`` (drawing never slows the model; stale
frames are skipped).  Files use ``block``: an unpaced replay must not lose frames, and
writing a frame (≈1 ms) is far cheaper than a model step.

Window keys: ``q``/Esc quits, space pauses/resumes the source, ``r`` resets the model
state.  The window runs its own GUI thread so keys work also while paused (no steps
arrive then).
"""
from __future__ import annotations

import collections
import colorsys
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stream.config import section
from stream.events import Instance, MaskResult, SensorSize, StreamReset
from stream.node import NodeError, RunContext, SinkNode, UsageError
from stream.registry import register_sink

#: BGR colours.
BACKGROUND = (20, 20, 20)
ON_COLOR = (235, 206, 135)  # light blue
OFF_COLOR = (0, 140, 255)  # orange
_FIXED = [(0, 230, 0), (230, 0, 230), (0, 230, 230), (40, 40, 230), (230, 120, 0), (230, 230, 230)]
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
MIN_SIDE_PX = 256


@section("overlay")
@dataclass(frozen=True)
class OverlayConfig:
    """``fps``: frames per second of *sensor* time.  ``decay_ms``: event fade time
    constant.  ``scale``: integer upscale (0 = auto: smallest side >= 256 px).
    ``alpha``: mask opacity.  ``path``: target when ``overlay`` has none (None = window
    if possible, else ``RUN_DIR/overlay.mp4``)."""

    fps: float = 30.0
    decay_ms: float = 50.0
    scale: int = 0
    show_hud: bool = True
    overwrite: bool = False
    path: str | None = None
    alpha: float = 0.45

    def __post_init__(self) -> None:
        if not (0.1 <= self.fps <= 1000):
            raise ValueError(f"fps={self.fps} is not allowed; use 0.1..1000 frames per second of sensor time")
        if not (0 < self.decay_ms <= 60_000):
            raise ValueError(f"decay_ms={self.decay_ms} is not allowed; use (0, 60000]")
        if not (0 <= self.scale <= 32):
            raise ValueError(f"scale={self.scale} is not allowed; use 1..32, or 0 for auto")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha={self.alpha} is not allowed; use 0..1")


# ------------------------------------------------------------------------------ pure parts
def class_color(k: int) -> tuple[int, int, int]:
    """BGR colour of class ``k`` (1-based): six fixed, then golden-ratio hues."""
    if 1 <= k <= len(_FIXED):
        return _FIXED[k - 1]
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
    return (int(b * 255), int(g * 255), int(r * 255))


_PALETTE = np.array([BACKGROUND] + [class_color(k) for k in range(1, 256)], dtype=np.float32)


def auto_scale(size: SensorSize, min_side: int = MIN_SIDE_PX) -> int:
    """Smallest integer upscale whose smaller side is >= ``min_side`` px (34x34 -> 8), capped at 16."""
    return int(min(16, max(1, math.ceil(min_side / min(size.width, size.height)))))


def frame_index(t_us: int, origin_us: int, fps: float) -> int:
    """Index of the frame of a segment starting at ``origin_us`` that holds sensor time ``t_us``:
    ``floor((t - T0) * fps / 1e6)``."""
    return int(math.floor((t_us - origin_us) * fps / 1e6))


def frame_count(origin_us: int, end_us: int, fps: float) -> int:
    """Frames in a segment ``[T0, end)``: ``ceil((end - T0) * fps / 1e6)`` (at least 1)."""
    return max(1, int(math.ceil((end_us - origin_us) * fps / 1e6)))


def render(
    ev_img: np.ndarray,
    mask: np.ndarray,
    instances: list[Instance] | tuple[Instance, ...],
    scale: int,
    alpha: float,
    hud: list[str] | None = None,
) -> np.ndarray:
    """Compose one BGR frame: background, events, translucent classes, boxes, HUD.

    ``ev_img`` is (H, W, 2) float intensities in [0, 1] (channel 0 = OFF, 1 = ON);
    ``pixel = bg`` blended toward each polarity colour by its intensity, then
    ``pixel = (1 - alpha) * pixel + alpha * colour(class)`` where the mask is non-zero.
    The result is upscaled by ``scale`` (nearest), padded to even sides (video codecs).
    """
    h, w = mask.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUND
    for ch, color in ((0, OFF_COLOR), (1, ON_COLOR)):
        a = ev_img[:, :, ch : ch + 1]
        if a.any():
            img += a * (np.asarray(color, np.float32) - img)
    lit = mask > 0
    if lit.any():
        img[lit] = img[lit] * (1.0 - alpha) + _PALETTE[mask[lit]] * alpha
    out = np.rint(img).astype(np.uint8)
    if scale > 1:
        out = cv2.resize(out, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    H2, W2 = out.shape[0] + out.shape[0] % 2, out.shape[1] + out.shape[1] % 2
    if (H2, W2) != out.shape[:2]:
        padded = np.zeros((H2, W2, 3), np.uint8)
        padded[: out.shape[0], : out.shape[1]] = out
        out = padded
    fs = 0.35 if out.shape[1] < 400 else 0.45
    for inst in instances:
        x0, y0, x1, y1 = inst.bbox
        color = class_color(inst.cls)
        p0, p1 = (x0 * scale, y0 * scale), ((x1 + 1) * scale - 1, (y1 + 1) * scale - 1)
        cv2.rectangle(out, p0, p1, color, 1)
        cv2.putText(out, f"#{inst.id}", (p0[0], max(10, p0[1] - 3)), cv2.FONT_HERSHEY_SIMPLEX, fs, color, 1,
                    cv2.LINE_AA)
    if hud:
        line_h = int(22 * fs / 0.45) + 2
        band = out[: line_h * len(hud) + 4, :]
        band //= 3  # darken behind the text (in place, a view)
        for i, text in enumerate(hud):
            cv2.putText(out, text, (4, line_h * (i + 1) - 2), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1,
                        cv2.LINE_AA)
    return out


@dataclass
class Frame:
    """One display frame of folded steps (native resolution; rendering happens later)."""

    index: int  # within the segment
    t_end_us: int  # sensor time at the end of the frame
    ev_img: np.ndarray
    mask: np.ndarray
    instances: list[Instance]
    n_events: int
    extra: dict[str, float] = field(default_factory=dict)


class FrameFolder:
    """Folds steps into frames of ``1/fps`` sensor time (see module doc); explicit state, no I/O."""

    def __init__(self, fps: float, decay_ms: float) -> None:
        self.fps = fps
        self.keep = math.exp(-(1e6 / fps) / (decay_ms * 1e3))  # per-frame event decay factor
        self.size: SensorSize | None = None
        self._reset_segment()

    def _reset_segment(self) -> None:
        self.origin: int | None = None
        self.cur = 0
        self.end_us = 0
        self._mask: np.ndarray | None = None  # union of this frame's masks
        self._inst: list[Instance] = []
        self._extra: dict[str, float] = {}
        self._events: list[np.ndarray] = []
        self._shown_mask: np.ndarray | None = None
        self._shown_inst: list[Instance] = []

    def _ensure(self, size: SensorSize) -> None:
        if self.size != size:
            self.size = size
            self.ev_img = np.zeros((size.height, size.width, 2), np.float32)
            self._shown_mask = None

    def _emit(self) -> Frame:
        assert self.size is not None and self.origin is not None  # set by add() before any emit
        self.ev_img *= self.keep
        n = 0
        for ev in self._events:
            x, y, p = ev["x"].astype(np.intp), ev["y"].astype(np.intp), ev["polarity"].astype(np.intp)
            ok = (x >= 0) & (x < self.size.width) & (y >= 0) & (y < self.size.height)
            self.ev_img[y[ok], x[ok], (p[ok] > 0).astype(np.intp)] = 1.0
            n += len(ev)
        if self._mask is not None:
            self._shown_mask, self._shown_inst = self._mask, self._inst
        mask = self._shown_mask if self._shown_mask is not None else np.zeros(
            (self.size.height, self.size.width), np.uint8
        )
        f = Frame(
            index=self.cur,
            t_end_us=self.origin + int(round((self.cur + 1) * 1e6 / self.fps)),
            ev_img=self.ev_img.copy(),
            mask=mask,
            instances=list(self._shown_inst),
            n_events=n,
            extra=dict(self._extra),
        )
        self._mask, self._inst, self._events = None, [], []
        self.cur += 1
        return f

    def add(self, result: MaskResult) -> list[Frame]:
        """Fold one step in; returns the frames completed before it (usually 0 or 1)."""
        step = result.step
        self._ensure(step.size)
        if self.origin is None:
            self.origin, self.cur = step.t0_us, 0
        out = []
        k = frame_index(step.t0_us, self.origin, self.fps)
        while self.cur < k:
            out.append(self._emit())
        m = result.mask
        self._mask = m.copy() if self._mask is None else np.where(m > 0, m, self._mask)
        self._inst = list(result.instances)
        self._extra.update(result.extra)
        if len(step.events):
            self._events.append(step.events)
        self.end_us = max(self.end_us, step.t1_us)
        return out

    def flush(self) -> list[Frame]:
        """End the segment: emit frames up to ``frame_count(T0, t1_last)``; the next step starts a new one."""
        out: list[Frame] = []
        if self.origin is not None:
            total = frame_count(self.origin, self.end_us, self.fps)
            while self.cur < total:
                out.append(self._emit())
        self._reset_segment()
        return out


def gui_available() -> tuple[bool, str]:
    """(True, "") when a window can be shown, else (False, why not)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY/WAYLAND_DISPLAY not set)"
    m = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.M)
    if m is None or m.group(1).upper() == "NONE":
        return False, "this OpenCV has no GUI support (opencv-python-headless)"
    return True, ""


# ------------------------------------------------------------------------------------ sink
class OverlaySink(SinkNode):
    """Renders folded frames to a window, a video file or a PNG folder."""

    name = "overlay"

    def __init__(self, cfg: OverlayConfig, target: str | None = None, gui: tuple[bool, str] | None = None) -> None:
        self.cfg = cfg
        target = target if target is not None else cfg.path
        ok, why = gui if gui is not None else gui_available()
        self.mode: str
        self._given: Path | None = None
        if target is None:
            self.mode = "window" if ok else "video"
            self._no_gui_reason = why
        elif target == "window":
            if not ok:
                raise UsageError(f"overlay window impossible: {why}; write a video instead: --sink overlay:out.mp4")
            self.mode = "window"
        elif target.endswith(("/", os.sep)) or Path(target).is_dir():
            self.mode, self._given = "png", Path(target)
        elif Path(target).suffix.lower() in VIDEO_CODECS:
            self.mode, self._given = "video", Path(target)
        else:
            raise UsageError(
                f"overlay target {target!r} not understood; use overlay, overlay:out.mp4, overlay:out.avi, "
                "overlay:frames/ or overlay:window"
            )
        # Per instance: the engine reads these when it builds this sink's input queue.
        self.queue_policy = "drop_oldest" if self.mode == "window" else "block"
        self.queue_capacity = 4 if self.mode == "window" else 64
        self.folder = FrameFolder(cfg.fps, cfg.decay_ms)
        self.path: Path | None = None
        self.frames_written = 0
        self.paused = False
        self._ctx: RunContext | None = None
        self._writer: Any = None
        self._scale = cfg.scale
        self._step_times: collections.deque[float] = collections.deque(maxlen=64)
        self._hud_cache: tuple[float, list[str]] = (0.0, [])
        # window mode
        self._latest: np.ndarray | None = None
        self._latest_lock = threading.Lock()
        self._gui_stop = threading.Event()
        self._gui_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def open(self, ctx: RunContext) -> None:
        self._ctx = ctx
        if self.mode == "window":
            self._gui_thread = threading.Thread(target=self._gui_loop, name="overlay-gui", daemon=True)
            self._gui_thread.start()
            return
        if self._given is None:
            if ctx.run_dir is None:
                raise NodeError("overlay: no display and no run folder; give a target: --sink overlay:out.mp4")
            self._given = Path(ctx.run_dir) / "overlay.mp4"
            print(f"overlay: {self._no_gui_reason}; writing video {self._given}", file=sys.stderr)
        path = self._given
        if self.mode == "png":
            old = sorted(path.glob("frame_*.png")) if path.is_dir() else []
            if old and not self.cfg.overwrite:
                raise NodeError(
                    f"{path} already holds frame_*.png files; pass --overwrite (overlay.overwrite: true) or pick another folder"
                )
            for f in old:
                f.unlink()
            path.mkdir(parents=True, exist_ok=True)
        else:
            if path.exists() and not self.cfg.overwrite:
                raise NodeError(f"{path} exists; pass --overwrite (overlay.overwrite: true) to replace it, or pick another path")
            if not path.parent.is_dir():
                raise NodeError(f"cannot write {path}: folder {path.parent} does not exist; create it or pick another path")
        self.path = path

    def close(self) -> None:
        try:
            if self._ctx is not None and self.mode != "window":
                self._output(self.folder.flush())  # the last frames of the segment
        except NodeError as e:
            # close() must not raise over the error that ended the run; say it, then release
            print(f"overlay: last frames not written: {e}", file=sys.stderr)
        finally:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.release()  # writes the container index: playable also after errors/Ctrl-C
            self._gui_stop.set()
            if self._gui_thread is not None:
                self._gui_thread.join(2.0)
                self._gui_thread = None
            self._ctx = None

    # -- data ------------------------------------------------------------------------------
    def process(self, item: MaskResult | StreamReset) -> None:
        if self._ctx is None:
            raise NodeError("overlay sink used before open() or after close(); this is a bug in the caller")
        if isinstance(item, StreamReset):
            self._output(self.folder.flush())
            return
        self._step_times.append(time.perf_counter())
        if self._scale == 0:
            self._scale = auto_scale(item.step.size)
        self._output(self.folder.add(item))

    def _hud(self, f: Frame) -> list[str]:
        """HUD lines; run-wide figures (latency, drops) are refreshed at most 4 times a second."""
        now = time.monotonic()
        if now - self._hud_cache[0] > 0.25 and self._ctx is not None:
            snap = self._ctx.metrics.snapshot()
            lat = snap.get("latency", {}).get("latency.e2e", {})
            counters, gauges = snap.get("counters", {}), snap.get("gauges", {})
            drops = sum(v for k, v in counters.items() if k.startswith("drops.")) + sum(
                q.get("dropped", 0) for q in snap.get("queues", {}).values()
            )
            line = f"lat p50 {lat.get('p50_ms', float('nan')):.1f} p99 {lat.get('p99_ms', float('nan')):.1f} ms  drops {int(drops)}"
            adapt = []
            if "adapt.updates" in counters:
                adapt.append(f"upd {int(counters['adapt.updates'])}")
            if "adapt.c_l" in gauges:
                adapt.append(f"C_l {gauges['adapt.c_l']:.4f}")
            self._hud_cache = (now, [line] + ([f"adapt {' '.join(adapt)}"] if adapt else []))
        ts = self._step_times
        sps = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0
        rate = f.n_events * self.cfg.fps
        extra = "  ".join(f"{k} {v:.4g}" for k, v in list(f.extra.items())[:3])
        lines = [
            f"t {f.t_end_us / 1e6:9.3f} s  {rate / 1e3:8.1f} kev/s  {sps:6.1f} steps/s",
            *self._hud_cache[1],
        ]
        if extra:
            lines.append(extra)
        return lines

    def _output(self, frames: list[Frame]) -> None:
        for f in frames:
            img = render(f.ev_img, f.mask, f.instances, self._scale or 1, self.cfg.alpha,
                         self._hud(f) if self.cfg.show_hud else None)
            if self.mode == "window":
                with self._latest_lock:
                    self._latest = img
            elif self.mode == "png" and self.path is not None:  # path is set by open()
                out = self.path / f"frame_{self.frames_written:06d}.png"
                if not cv2.imwrite(str(out), img):
                    raise NodeError(f"overlay: cannot write {out}; check the folder is writable and has space")
            else:
                if self._writer is None:
                    self._open_video(img.shape[1], img.shape[0])
                self._writer.write(img)
            self.frames_written += 1

    def _open_video(self, width: int, height: int) -> None:
        if self.path is None:
            raise NodeError("overlay sink used before open(); this is a bug in the caller")
        codec = VIDEO_CODECS[self.path.suffix.lower()]
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codec), float(self.cfg.fps), (width, height))
        if not writer.isOpened():
            raise NodeError(
                f"overlay: cannot write {self.path}: OpenCV has no {codec!r} encoder here; "
                "try overlay:out.avi (MJPG) or PNG frames with overlay:DIR/"
            )
        self._writer = writer

    # -- window ------------------------------------------------------------------------------
    def handle_key(self, key: int) -> None:
        """React to a key code from ``cv2.waitKey``: q/Esc quit, space pause/resume, r reset."""
        ctx = self._ctx
        if ctx is None:
            return
        if key in (ord("q"), 27):
            ctx.stop.set()
        elif key == ord(" "):
            self.paused = not self.paused
            ctx.request_pause(self.paused)
        elif key == ord("r"):
            ctx.request_reset("user pressed r")

    def _gui_loop(self) -> None:  # pragma: no cover - needs a display
        title = "SpikeStream overlay (q quit, space pause, r reset)"
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        try:
            while not self._gui_stop.is_set() and self._ctx is not None and not self._ctx.stop.is_set():
                with self._latest_lock:
                    img, self._latest = self._latest, None
                if img is not None:
                    cv2.imshow(title, img)
                key = cv2.waitKey(15)
                if key >= 0:
                    self.handle_key(key & 0xFF)
        finally:
            cv2.destroyWindow(title)


@register_sink(
    "overlay",
    "draw events, masks and instance boxes in a window, a video (.mp4/.avi) or PNG frames (DIR/)",
    "overlay or overlay:out.mp4",
)
def make_overlay(arg: str | None, cfg: Any) -> OverlaySink:
    """Factory: ``overlay`` (window or RUN_DIR/overlay.mp4), ``overlay:PATH.mp4|.avi|DIR/|window``."""
    ocfg: OverlayConfig = cfg["overlay"] if cfg is not None and "overlay" in cfg else OverlayConfig()
    return OverlaySink(ocfg, arg or None)
