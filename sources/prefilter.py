"""Noise filtering and region of interest, applied in the source thread to every source.

Order: hot-pixel mask -> background-activity filter -> crop -> downscale (hot pixels
must not "support" their neighbours in the BA filter; ROI last so that filtering sees
the whole sensor's neighbourhoods).

Background activity (BA) filter
-------------------------------
The same rule as ``dv.noise.BackgroundActivityNoiseFilter`` (dv-processing 2.0.4),
reimplemented as a compiled pure function over a keep-mask::

    keep_i = exists n in N8(x_i, y_i):  t_i - T[n] < window        (8 neighbours, not the pixel)
    T[y_i, x_i] <- t_i                                             (after the test, kept or not)

Why not call dv's filter: 2.0.4 has no numpy -> ``EventStore`` constructor (``push_back``
runs at ~1 M events/s, slower than the sensors we read), and its output is a new store,
which loses the alignment with ``EventPacket.labels``.  A keep-mask keeps labels
aligned for free.  ``tests/sources/test_prefilter.py`` checks that the kept events equal
dv's filter output event for event.  One deliberate difference: dv starts its time
surface at 0, so every event in the first ``window`` µs of sensor time counts as
supported; we start at "never" (a very negative time), so noise at start-up is filtered
too (the tests start timestamps beyond the window so both agree).

Downscale ``d``: ``x' = (x - x0) // d``, ``size_out = ceil(w / d) x ceil(h / d)`` (ceil so
that the last partial block of pixels still has a place).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from stream.config import Config, section
from stream.events import EventPacket, SensorSize, StreamReset
from stream.node import NodeError, RunContext, UsageError

_NEVER = np.int64(-(2**62))


@section("filter")
@dataclass(frozen=True)
class FilterConfig:
    """Noise filtering (off by default).

    ``enabled``: master switch.  ``background_activity``: drop events with no event in
    their 8-neighbourhood within ``ba_window_us`` µs before them (dv-processing's BA rule).
    ``hot_pixels``: ``[[x, y], ...]`` sensor pixels whose events are always dropped.
    """

    enabled: bool = False
    background_activity: bool = True
    ba_window_us: int = 2000
    hot_pixels: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.ba_window_us <= 10_000_000:
            raise ValueError(f"ba_window_us {self.ba_window_us} out of range; allowed 1..10000000 µs")
        for xy in self.hot_pixels:
            if len(xy) != 2 or min(xy) < 0:
                raise ValueError(f"hot pixel {list(xy)} invalid; give [x, y] pairs of non-negative integers")


@section("roi")
@dataclass(frozen=True)
class RoiConfig:
    """Region of interest: ``crop`` ``[x, y, width, height]`` in sensor pixels (or null),
    then integer ``downscale`` >= 1 (coordinates divided, rounded down)."""

    crop: tuple[int, int, int, int] | None = None
    downscale: int = 1

    def __post_init__(self) -> None:
        if self.downscale < 1 or self.downscale > 64:
            raise ValueError(f"downscale {self.downscale} out of range; use an integer 1..64")
        if self.crop is not None:
            x, y, w, h = self.crop
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise ValueError(f"crop {list(self.crop)} invalid; use [x >= 0, y >= 0, width >= 1, height >= 1]")


@numba.njit(cache=True, nogil=True)
def ba_keep(t: np.ndarray, x: np.ndarray, y: np.ndarray, surface: np.ndarray, window_us: int) -> np.ndarray:
    """Background-activity keep mask; updates ``surface`` (H, W int64 last-event times) in place.

    ``keep_i = any_{n in N8(x_i, y_i)} (t_i - surface[n] < window_us)``, then
    ``surface[y_i, x_i] = t_i``.  Events must be inside ``surface``.
    """
    h, w = surface.shape
    keep = np.zeros(t.shape[0], dtype=np.bool_)
    for i in range(t.shape[0]):
        xi = np.int64(x[i])
        yi = np.int64(y[i])
        ti = t[i]
        ok = False
        for dy in (-1, 0, 1):
            yy = yi + dy
            if yy < 0 or yy >= h:
                continue
            for dx in (-1, 0, 1):
                if dx == 0 and dy == 0:
                    continue
                xx = xi + dx
                if xx < 0 or xx >= w:
                    continue
                if ti - surface[yy, xx] < window_us:
                    ok = True
                    break
            if ok:
                break
        keep[i] = ok
        surface[yi, xi] = ti
    return keep


def roi_size(size: SensorSize, crop: tuple[int, int, int, int] | None, downscale: int) -> SensorSize:
    """Output geometry: the crop (or the sensor), divided by ``downscale`` rounding up."""
    w, h = (crop[2], crop[3]) if crop is not None else (size.width, size.height)
    return SensorSize(-(-w // downscale), -(-h // downscale))


class PreFilter:
    """Stateful per-stream filter: ``open(ctx)``, ``process(packet)``, ``reset(size)``, ``close()``.

    With nothing enabled ``process`` returns the very packet it got (no copy, no count).
    """

    def __init__(self, fcfg: FilterConfig, rcfg: RoiConfig, size: SensorSize) -> None:
        self.fcfg = fcfg
        self.rcfg = rcfg
        self.metrics: Any = None
        self.reset(size, where="config")

    @property
    def active(self) -> bool:
        return self._active

    def reset(self, size: SensorSize, where: str = "stream") -> None:
        """New stream geometry (next file): validate the ROI again, clear the BA state."""
        err = UsageError if where == "config" else NodeError
        f, r = self.fcfg, self.rcfg
        self.size_in = size
        if r.crop is not None:
            x, y, w, h = r.crop
            if x + w > size.width or y + h > size.height:
                raise err(
                    f"roi.crop [{x}, {y}, {w}, {h}] does not fit the {size} sensor; "
                    f"use x + width <= {size.width} and y + height <= {size.height}"
                )
        self.size_out = roi_size(size, r.crop, r.downscale)
        self._hot: np.ndarray | None = None
        if f.enabled and f.hot_pixels:
            bad = [list(p) for p in f.hot_pixels if p[0] >= size.width or p[1] >= size.height]
            if bad:
                raise err(f"filter.hot_pixels {bad} outside the {size} sensor; use 0 <= x < {size.width}, 0 <= y < {size.height}")
            self._hot = np.zeros((size.height, size.width), dtype=np.bool_)
            hp = np.asarray(f.hot_pixels, dtype=np.int64)
            self._hot[hp[:, 1], hp[:, 0]] = True
        self._surface = (
            np.full((size.height, size.width), _NEVER, dtype=np.int64) if f.enabled and f.background_activity else None
        )
        self._roi = r.crop is not None or r.downscale != 1
        self._active = (f.enabled and (self._hot is not None or self._surface is not None)) or self._roi

    def open(self, ctx: RunContext) -> None:
        self.metrics = ctx.metrics

    def close(self) -> None:
        self.metrics = None

    def process(self, packet: EventPacket) -> EventPacket:
        """Filter one packet; ``labels`` stay aligned with the surviving events."""
        if not self._active:
            return packet
        ev = packet.events
        n_in = len(ev)
        keep: np.ndarray | None = None
        if n_in:
            if self._hot is not None or self._surface is not None:
                # events outside the sensor would index out of the maps (numba does not
                # bounds-check): drop them here, as the binner would
                x, y = ev["x"], ev["y"]
                sz = self.size_in
                valid = (x >= 0) & (x < sz.width) & (y >= 0) & (y < sz.height)
                if not valid.all():
                    keep = valid
            if self._hot is not None:
                hot = self._hot[np.where(keep, ev["y"], 0), np.where(keep, ev["x"], 0)] if keep is not None else self._hot[ev["y"], ev["x"]]
                keep = ~hot if keep is None else keep & ~hot
            if self._surface is not None:
                # the BA filter must see only events that survived the hot-pixel mask
                sub = ev if keep is None else ev[keep]
                ba = ba_keep(sub["timestamp"], sub["x"], sub["y"], self._surface, self.fcfg.ba_window_us)
                if keep is None:
                    keep = ba
                else:
                    keep[keep] = ba
            if self._roi and self.rcfg.crop is not None:
                x0, y0, w, h = self.rcfg.crop
                inside = (ev["x"] >= x0) & (ev["x"] < x0 + w) & (ev["y"] >= y0) & (ev["y"] < y0 + h)
                keep = inside if keep is None else keep & inside
        out_ev = ev if keep is None else ev[keep]
        labels = packet.labels if (keep is None or packet.labels is None) else packet.labels[keep]
        if self._roi and len(out_ev):
            if out_ev is ev:
                out_ev = ev.copy()  # never mutate the caller's array
            x0, y0 = (self.rcfg.crop[0], self.rcfg.crop[1]) if self.rcfg.crop is not None else (0, 0)
            d = self.rcfg.downscale
            out_ev["x"] = (out_ev["x"] - x0) // d
            out_ev["y"] = (out_ev["y"] - y0) // d
        if self.metrics is not None:
            self.metrics.inc("filter.in", n_in)
            self.metrics.inc("filter.out", len(out_ev))
        return EventPacket(out_ev, self.size_out, packet.t_end_us, labels)

    def apply(self, item: EventPacket | StreamReset) -> EventPacket | StreamReset:
        """Packets are filtered; a reset with a size re-targets the filter and carries ``size_out``."""
        if isinstance(item, StreamReset):
            if item.size is None:
                return item
            self.reset(item.size)
            return StreamReset(item.reason, self.size_out, item.source)
        return self.process(item)


def build_prefilter(cfg: Config, size: SensorSize) -> PreFilter:
    """The filter for a stream of ``size`` from the ``filter`` and ``roi`` sections."""
    return PreFilter(cfg["filter"], cfg["roi"], size)
