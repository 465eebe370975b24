"""Built-in synthetic scenes: a DVS emulator with exact ground truth (the default source).

What it emulates (v2e/ESIM, simplified and fast)
-----------------------------------------------
Each pixel ``p`` sees a linear intensity ``I_p(t)`` (white = 1) and works on its log,
``L_p(t) = log(I_p(t) + I_dark)`` with ``I_dark = 0.02`` (dark current: keeps the log finite
and makes very dark regions less sensitive, as on a real sensor).  A pixel keeps a
reference level ``r_p``.  The scene is rendered every ``substep_us`` (frames ``L^k`` at
``t_k = k * substep_us``); between two frames the log intensity is taken as linear, and

* while ``L^k_p - r_p >= C_on,p`` the pixel emits an ON event and ``r_p += C_on,p``;
* while ``r_p - L^k_p >= C_off,p`` it emits an OFF event and ``r_p -= C_off,p``.

The ``j``-th crossing level ``ℓ_j = r_p ± j C`` is reached at
``t = t_{k-1} + (ℓ_j - L^{k-1}_p) / (L^k_p - L^{k-1}_p) * substep_us`` (linear interpolation,
floored to integer µs, so a sub-step's events lie in ``[t_{k-1}, t_k)``).  Thresholds carry a
fixed per-pixel mismatch ``C_p = C + σ N(0, 1)`` drawn from the seed.

Refractory period: an event closer than ``refractory_us`` to the previous *emitted* event of
the same pixel is dropped.  The reference still moves for dropped crossings (the pixel is
reset by its own comparator; the alternative, holding ``r_p`` back, would make the pixel
fire a burst as soon as the period ends, which real pixels do not do).  Background activity
(Poisson, ``noise_hz`` per pixel, random polarity) and hot pixels (50-200 Hz each) pass the
same refractory filter, so ``t_{i+1} - t_i >= refractory_us`` holds for every pixel.

Ground truth: each event of a crossing between frames ``k-1`` and ``k`` is labelled with the
nearest-in-depth object whose sprite covers the pixel (alpha > 0) in either frame; noise and
background (stars, texture under camera jitter) are 0.

How it stays fast
-----------------
Objects are pre-rendered once into small anti-aliased alpha sprites (cv2, 4-8x supersampled);
at time ``t`` an object's alpha at pixel ``p`` is the bilinear sample ``S(p - c(t) + a)``.
A pixel can change only where some sprite's 2x2 sample block is not constant, so each
batch of ``batch_us`` only the pixels near object edges (plus, under camera jitter, near
background texture) are rendered and emulated: for 346x260 this is a few thousand pixels
instead of 90 000 per sub-step.  The two per-pixel recurrences (reference level over
sub-steps, refractory over events) are sequential by nature; they and the sprite sampling
run as numba-compiled loops, rendering and emulating in one pass per pixel.  The
alternative, numpy vectorised over pixels with a Python loop over the 4 000 sub-steps per
second, pays ~20 numpy calls (~40 µs) per sub-step before any work: below 5x real time
by itself.

Everything is deterministic by ``seed``, and independent of ``packet_us`` (the scene is
always emulated in whole batches; packets are cut from that).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import cv2
import numba
import numpy as np

from stream.clock import Clock, WallClock
from stream.config import Config, section
from stream.events import EVENT_DTYPE, EventPacket, SensorSize, concat_events
from stream.node import NodeError, RunContext, SourceNode, UsageError
from stream.registry import register_source

#: Scene names, the first is the default.
SCENES: tuple[str, ...] = ("mixed", "satellites", "shapes", "digits", "noise")
#: Seeds at or above this are the held-out benchmark; training must use seeds below it.
BENCHMARK_SEED_MIN = 1000
#: Dark current in units of white (see module docstring).
I_DARK = 0.02
#: Hot pixel rate range in Hz.
HOT_HZ = (50.0, 200.0)
#: Scene default speed ranges in px/s.
_DEFAULT_SPEEDS = {"satellite": (20.0, 150.0), "shape": (30.0, 200.0), "digit": (30.0, 120.0)}
#: Object class when ``class_by_kind`` is set.
KIND_CLASS = {"satellite": 1, "shape": 2, "digit": 3}
_MAX_ID = 32767  # labels are int16; ids wrap after this (hours of satellites)
_KEEP_DEAD_US = 1_000_000


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
@section("synthetic")
@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in synthetic scene (``synthetic`` / ``synthetic:SCENE`` source).

    Times in µs unless the name says otherwise; contrasts are in natural-log units.
    ``n_objects = 0`` and ``speed_px_s = None`` take the scene's own defaults
    (satellites 1-4 at 20-150 px/s, shapes 1-3 at 30-200 px/s, digits 1-2 at 30-120 px/s).
    """

    width: int = 346
    height: int = 260
    seed: int = 0
    scene: str = "mixed"
    duration_s: float = 10.0  # 0 = endless
    realtime: bool = False
    packet_us: int = 1000
    substep_us: int = 250
    batch_us: int = 10000  # sensor time emulated per internal batch (a multiple of substep_us)
    contrast_on: float = 0.2
    contrast_off: float = 0.2
    mismatch: float = 0.03  # σ of the per-pixel threshold, log units
    refractory_us: int = 100
    noise_hz: float = 0.1  # background activity per pixel
    n_hot_pixels: int = 3
    jitter_px: float = 0.0  # camera shake amplitude
    n_objects: int = 0
    speed_px_s: tuple[float, float] | None = None
    class_by_kind: bool = False

    def __post_init__(self) -> None:
        if self.scene not in SCENES:
            raise ValueError(f"scene {self.scene!r} is unknown; use one of {', '.join(SCENES)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not 16 <= v <= 4096:
                raise ValueError(f"{name}={v} is out of range; allowed 16..4096 pixels")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} is negative; use an integer >= 0")
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"duration_s={self.duration_s} is invalid; use seconds >= 0 (0 = endless)")
        if not 1 <= self.packet_us <= 1_000_000:
            raise ValueError(f"packet_us={self.packet_us} is out of range; allowed 1..1000000")
        if not 10 <= self.substep_us <= 10_000:
            raise ValueError(f"substep_us={self.substep_us} is out of range; allowed 10..10000")
        if self.batch_us < self.substep_us or self.batch_us % self.substep_us or self.batch_us > 1_000_000:
            raise ValueError(
                f"batch_us={self.batch_us} is invalid; use a multiple of substep_us={self.substep_us} up to 1000000"
            )
        for name in ("contrast_on", "contrast_off"):
            v = getattr(self, name)
            if not 0.01 <= v <= 2.0:
                raise ValueError(f"{name}={v} is out of range; allowed 0.01..2.0 (log units)")
        if not 0 <= self.mismatch <= 0.5 * min(self.contrast_on, self.contrast_off):
            raise ValueError(f"mismatch={self.mismatch} is out of range; allowed 0..half the smaller contrast")
        if not 0 <= self.refractory_us <= 1_000_000:
            raise ValueError(f"refractory_us={self.refractory_us} is out of range; allowed 0..1000000")
        if not 0 <= self.noise_hz <= 1000:
            raise ValueError(f"noise_hz={self.noise_hz} is out of range; allowed 0..1000 Hz per pixel")
        if not 0 <= self.n_hot_pixels <= 1000:
            raise ValueError(f"n_hot_pixels={self.n_hot_pixels} is out of range; allowed 0..1000")
        if not 0 <= self.jitter_px <= 20:
            raise ValueError(f"jitter_px={self.jitter_px} is out of range; allowed 0..20 pixels")
        if not 0 <= self.n_objects <= 16:
            raise ValueError(f"n_objects={self.n_objects} is out of range; allowed 0..16 (0 = scene default)")
        if self.speed_px_s is not None:
            lo, hi = self.speed_px_s
            if not 0 <= lo <= hi <= 5000:
                raise ValueError(f"speed_px_s={list(self.speed_px_s)} is invalid; use [min, max] with 0 <= min <= max <= 5000")


# --------------------------------------------------------------------------------------
# compiled kernels (pure: they only write the arrays they are given)
# --------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _pixel(
    x: int, y: int, k: int, lbg: np.ndarray, pad: int, jx: np.ndarray, jy: np.ndarray, use_jitter: bool,
    rel: np.ndarray, n_rel: int, sprites: np.ndarray, sp_off: np.ndarray, sp_h: np.ndarray, sp_w: np.ndarray,
    anc_x: np.ndarray, anc_y: np.ndarray, pos_x: np.ndarray, pos_y: np.ndarray, values: np.ndarray,
    alpha_min: float,
) -> tuple[float, float, int]:
    """One pixel in frame ``k``: ``(L_bg, I, top)``; ``I < 0`` means no sprite touches it.

    ``L_bg = bilinear(log B, p - j_k)`` (the background is interpolated in the log domain,
    a choice of the continuous scene: pixels that only see the moving background, the bulk
    under camera jitter, need no exp/log).  Where sprites touch, ``I = exp(L_bg) - I_dark``,
    then far to near ``I += α (v - I)``, ``α = bilinear(S, p - c_k + a)``; ``top`` is the
    nearest object with ``α >= alpha_min`` (its depth code r + 1), else 0.
    """
    if use_jitter:
        # the padding (> |j| + 1) stands for the scene beyond the sensor edge: no clamping
        u = x - jx[k] + pad
        v = y - jy[k] + pad
        i0 = int(math.floor(u))
        j0 = int(math.floor(v))
        fu = u - i0
        fv = v - j0
        lb = ((1 - fu) * (1 - fv) * lbg[j0, i0] + fu * (1 - fv) * lbg[j0, i0 + 1]
              + (1 - fu) * fv * lbg[j0 + 1, i0] + fu * fv * lbg[j0 + 1, i0 + 1])
    else:
        lb = lbg[y + pad, x + pad]
    top = 0
    inten = -1.0
    for q in range(n_rel):
        o = rel[q]
        w = sp_w[o]
        u = x - pos_x[o, k] + anc_x[o]
        if u < 0.0 or u >= w - 1:
            continue  # outside the sprite (its 1-px border is zero)
        v = y - pos_y[o, k] + anc_y[o]
        if v < 0.0 or v >= sp_h[o] - 1:
            continue
        i0 = int(u)
        j0 = int(v)
        fu = u - i0
        fv = v - j0
        b = sp_off[o] + j0 * w + i0
        a = ((1 - fu) * (1 - fv) * sprites[b] + fu * (1 - fv) * sprites[b + 1]
             + (1 - fu) * fv * sprites[b + w] + fu * fv * sprites[b + w + 1])
        if a > 0.0:
            if inten < 0.0:
                inten = math.exp(lb) - I_DARK
            inten += a * (values[o] - inten)
            if a >= alpha_min:
                top = o + 1
    return lb, inten, top


@numba.njit(cache=True, nogil=True)
def _render_kernel(
    active: np.ndarray, width: int, lbg: np.ndarray, pad: int, jx: np.ndarray, jy: np.ndarray, use_jitter: bool,
    sprites: np.ndarray, sp_off: np.ndarray, sp_h: np.ndarray, sp_w: np.ndarray, anc_x: np.ndarray,
    anc_y: np.ndarray, pos_x: np.ndarray, pos_y: np.ndarray, values: np.ndarray, alpha_min: float,
    log_out: np.ndarray, top_out: np.ndarray,
) -> None:
    """Frames ``log_out[k, n] = L`` and depth codes ``top_out[k, n]`` of pixels ``active``
    (every object considered; used for the first frame and for ground-truth masks)."""
    n_obj = values.shape[0]
    rel = np.arange(n_obj)
    for n in range(active.shape[0]):
        y = active[n] // width
        x = active[n] - y * width
        for k in range(log_out.shape[0]):
            lb, inten, top = _pixel(x, y, k, lbg, pad, jx, jy, use_jitter, rel, n_obj, sprites, sp_off, sp_h,
                                    sp_w, anc_x, anc_y, pos_x, pos_y, values, alpha_min)
            log_out[k, n] = lb if inten < 0.0 else math.log(inten + I_DARK)
            top_out[k, n] = top


@numba.njit(cache=True, nogil=True)
def _emulate_kernel(
    active: np.ndarray, width: int, lbg: np.ndarray, pad: int, jx: np.ndarray, jy: np.ndarray, use_jitter: bool,
    sprites: np.ndarray, sp_off: np.ndarray, sp_h: np.ndarray, sp_w: np.ndarray, anc_x: np.ndarray,
    anc_y: np.ndarray, pos_x: np.ndarray, pos_y: np.ndarray, values: np.ndarray, log_now: np.ndarray,
    code_now: np.ndarray, ref: np.ndarray, c_on: np.ndarray, c_off: np.ndarray, t0: int, substep: int,
    out_t: np.ndarray, out_pix: np.ndarray, out_pol: np.ndarray, out_code: np.ndarray,
) -> int:
    """Render frames ``k = 1..K`` of the active pixels and emit their threshold crossings.

    Per pixel, with ``L^0 = log_now``: while ``L^k - r >= C_on`` emit ON, ``r += C_on``;
    while ``r - L^k >= C_off`` emit OFF, ``r -= C_off``; crossing ``j`` of a sub-step at
    ``t_{k-1} + (ℓ_j - L^{k-1}) / (L^k - L^{k-1}) S``, floored, within ``[t_{k-1}, t_k)``.
    Its code is the nearer of the two frames' depth codes.  Updates ``ref``, ``log_now``
    and ``code_now`` (per active pixel) in place; returns the number of events.  Writes
    only the first ``len(out_t)`` events: when the return value is larger, the caller
    restores ``ref`` and calls again with bigger outputs (rendering and emulating in one
    pass keeps the K frames in registers instead of a (K, N) array in memory).
    """
    n_obj = values.shape[0]
    K = pos_x.shape[1]
    cap = out_t.shape[0]
    # each object's pixel range over the whole batch: pixels outside never see it
    lox = np.empty(n_obj)
    hix = np.empty(n_obj)
    loy = np.empty(n_obj)
    hiy = np.empty(n_obj)
    for o in range(n_obj):
        lox[o] = pos_x[o].min() - anc_x[o]
        hix[o] = pos_x[o].max() - anc_x[o] + sp_w[o] - 1
        loy[o] = pos_y[o].min() - anc_y[o]
        hiy[o] = pos_y[o].max() - anc_y[o] + sp_h[o] - 1
    rel = np.empty(n_obj, np.int64)
    e = 0
    for n in range(active.shape[0]):
        p = active[n]
        y = p // width
        x = p - y * width
        n_rel = 0
        for o in range(n_obj):
            if lox[o] <= x < hix[o] and loy[o] <= y < hiy[o]:
                rel[n_rel] = o
                n_rel += 1
        r = ref[p]
        con = c_on[p]
        coff = c_off[p]
        l0 = log_now[n]
        c0 = code_now[n]
        last_inten = -1.0
        last_log = 0.0
        for k in range(K):
            lb, inten, c1 = _pixel(x, y, k, lbg, pad, jx, jy, use_jitter, rel, n_rel, sprites, sp_off, sp_h,
                                   sp_w, anc_x, anc_y, pos_x, pos_y, values, 0.0)
            if inten < 0.0:
                l1 = lb
            else:
                if inten != last_inten:  # a covered pixel is mostly still: skip the log
                    last_inten = inten
                    last_log = math.log(inten + I_DARK)
                l1 = last_log
            d = l1 - r
            m = 0
            step = 0.0
            polarity = 0
            if d >= con:
                m = int(d / con)
                step = con
                polarity = 1
            elif -d >= coff:
                m = int(-d / coff)
                step = -coff
                polarity = 0
            if m > 0:
                dl = l1 - l0
                lab = c0 if c0 > c1 else c1
                tk = t0 + k * substep
                for j in range(1, m + 1):
                    if e < cap:
                        frac = (r + j * step - l0) / dl if dl != 0.0 else 1.0
                        frac = min(max(frac, 0.0), 1.0)
                        out_t[e] = tk + min(int(frac * substep), substep - 1)
                        out_pix[e] = p
                        out_pol[e] = polarity
                        out_code[e] = lab
                    e += 1
                r += m * step
            l0 = l1
            c0 = c1
        ref[p] = r
        log_now[n] = l0
        code_now[n] = c0
    return e


@numba.njit(cache=True, nogil=True)
def _refractory_kernel(ts: np.ndarray, pix: np.ndarray, last: np.ndarray, refractory_us: int) -> np.ndarray:
    """Keep event i iff ``t_i - t_last(p_i) >= refractory_us`` (events in time order);
    ``last`` (per pixel, time of the last kept event) is updated in place."""
    keep = np.empty(ts.shape[0], np.bool_)
    for i in range(ts.shape[0]):
        p = pix[i]
        if ts[i] - last[p] >= refractory_us:
            keep[i] = True
            last[p] = ts[i]
        else:
            keep[i] = False
    return keep


# --------------------------------------------------------------------------------------
# scene objects (pure maths on positions; sprites drawn once with cv2)
# --------------------------------------------------------------------------------------
def _alloc_out(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Event output buffers of the emulation kernel: time, pixel, polarity, depth code."""
    return np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int8), np.empty(n, np.int16)


def _edge_blocks(img: np.ndarray) -> np.ndarray:
    """``(E, 2)`` int64 ``(x, y)`` of the 2x2 blocks of ``img`` that are not constant.

    A bilinear sample inside a constant block does not depend on the sub-pixel offset,
    so only pixels that sample an edge block can change while the image moves.
    """
    blk = np.stack([img[:-1, :-1], img[:-1, 1:], img[1:, :-1], img[1:, 1:]])
    ys, xs = np.nonzero(blk.max(0) != blk.min(0))
    return np.stack([xs, ys], 1).astype(np.int64)


def reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position bouncing between ``lo`` and ``hi``: a triangle wave of the unbounded ``x``.

    ``s = (x - lo) mod 2(hi - lo)``; ``pos = lo + s`` if ``s <= hi - lo`` else ``lo + 2(hi - lo) - s``.
    """
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo, dtype=np.float64)
    s = np.mod(x - lo, 2 * span)
    return lo + np.where(s <= span, s, 2 * span - s)


@dataclass
class SceneObject:
    """One moving object: a sprite, a motion law, a depth and a label.

    Motion: ``c(t) = c0 + v (t - t_birth)`` (µs -> s), reflected into ``bounds`` when
    ``bounce``; satellites fly straight and live in ``[t_birth_us, t_death_us]``
    (they are born and die outside the frame).
    """

    id: int
    kind: str
    cls: int
    sprite: np.ndarray  # (h, w) float64 alpha in [0, 1], zero 1-px border
    anchor: tuple[float, float]  # object centre in sprite coords (x, y)
    value: float  # linear intensity
    depth: float  # larger = nearer
    x0: float
    y0: float
    vx: float  # px/s
    vy: float
    t_birth_us: float = 0.0
    t_death_us: float = math.inf
    bounce: bool = False
    bounds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # xlo, xhi, ylo, yhi
    edge_blocks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (E, 2) x, y

    def __post_init__(self) -> None:
        s = self.sprite
        # a 2x2 sample block is "edge" when not constant: only there can alpha change
        self.edge_blocks = _edge_blocks(self.sprite)

    def center(self, t_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scene position (without camera jitter) at times ``t_us``."""
        dt = (np.asarray(t_us, dtype=np.float64) - self.t_birth_us) * 1e-6
        x = self.x0 + self.vx * dt
        y = self.y0 + self.vy * dt
        if self.bounce:
            xlo, xhi, ylo, yhi = self.bounds
            x, y = reflect(x, xlo, xhi), reflect(y, ylo, yhi)
        return x, y


@dataclass(frozen=True)
class ObjectState:
    """An object as seen at one time: image position (camera jitter included) and footprint.

    ``bbox`` is ``(x0, y0, x1, y1)`` inclusive, integer pixels, not clipped to the sensor:
    every pixel the object's sprite touches (alpha > 0).
    """

    id: int
    cls: int
    kind: str
    x: float
    y: float
    bbox: tuple[int, int, int, int]


def _supersampled(draw: Callable[[np.ndarray, int], None], h: int, w: int, ss: int, blur: float = 0.0) -> np.ndarray:
    """Draw at ``ss``x with ``draw(canvas, ss)``, area-downsample to (h, w), pad 1 px of zeros."""
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    draw(canvas, ss)
    small = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    if blur > 0:
        small = cv2.GaussianBlur(small, (0, 0), blur)
        small[small < 1e-3] = 0.0  # keep the support compact (labels use alpha > 0)
    return np.pad(small, 1)


def _sprite_satellite(rng: np.random.Generator, angle: float) -> tuple[np.ndarray, str]:
    """A 3-7 px blob, elongated (ratio 1.5-2.5) half of the time, along ``angle``."""
    length = rng.uniform(3.0, 7.0)
    ratio = rng.uniform(1.5, 2.5) if rng.random() < 0.5 else 1.0
    short = max(length / ratio, 2.0)
    size = int(math.ceil(length)) + 4
    ss = 8

    def draw(c: np.ndarray, s: int) -> None:
        ctr = (c.shape[1] / 2.0, c.shape[0] / 2.0)
        cv2.ellipse(c, ((ctr[0], ctr[1]), (length * s, short * s), math.degrees(angle)), 255, -1, cv2.LINE_AA)

    return _supersampled(draw, size, size, ss, blur=0.5), "satellite"


def _sprite_shape(rng: np.random.Generator) -> np.ndarray:
    """A filled rectangle (rotated), circle or triangle, 20-70 px across."""
    kind = rng.choice(["rect", "circle", "triangle"])
    d = rng.uniform(20.0, 70.0)
    size = int(math.ceil(d * 1.45)) + 4  # room for a rotated rectangle's diagonal
    ss = 4
    angle = rng.uniform(0, math.pi)
    if kind == "rect":
        w, h = d, rng.uniform(0.4, 1.0) * d
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    elif kind == "triangle":
        a = np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([np.cos(a), np.sin(a)], 1) * d / 2
    else:
        pts = None
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def draw(c: np.ndarray, s: int) -> None:
        cx, cy = c.shape[1] / 2.0, c.shape[0] / 2.0
        if pts is None:
            cv2.circle(c, (int(cx), int(cy)), int(d * s / 2), 255, -1, cv2.LINE_AA)
        else:
            q = (pts @ rot.T) * s + [cx, cy]
            cv2.fillPoly(c, [np.round(q).astype(np.int32)], 255, cv2.LINE_AA)

    return _supersampled(draw, size, size, ss)


def _sprite_digit(rng: np.random.Generator) -> np.ndarray:
    """A thick digit (cv2.putText, Hershey simplex), 50-90 px tall."""
    text = str(int(rng.integers(0, 10)))
    height = rng.uniform(50.0, 90.0)
    thick = max(2, int(height * rng.uniform(0.10, 0.16)))
    ss = 4
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, 1.0, 1)
    scale = height / th
    w = int(tw * scale + 2 * thick + 6)
    h = int(height + 2 * thick + 6)

    def draw(c: np.ndarray, s: int) -> None:
        (tw2, th2), _ = cv2.getTextSize(text, font, scale * s, thick * s)
        org = ((c.shape[1] - tw2) // 2, (c.shape[0] + th2) // 2)
        cv2.putText(c, text, org, font, scale * s, 255, thick * s, cv2.LINE_AA)

    return _supersampled(draw, h, w, ss)


def _contrasting_value(rng: np.random.Generator, bg_level: float) -> float:
    """An intensity 0.5-1.6 log units brighter or darker than ``bg_level`` (sign random,
    flipped when the chosen side has no room)."""
    for sign in ([1, -1] if rng.random() < 0.5 else [-1, 1]):
        v = (bg_level + I_DARK) * math.exp(sign * rng.uniform(0.5, 1.6)) - I_DARK
        if 0.0 <= v <= 1.0:
            return float(v)
    return 1.0 if bg_level < 0.5 else 0.0


# --------------------------------------------------------------------------------------
# backgrounds
# --------------------------------------------------------------------------------------
def _star_sky(rng: np.random.Generator, h: int, w: int, sky: float) -> np.ndarray:
    """Dark sky plus a static star field: many faint and few bright Gaussian points.

    Amplitudes follow a power law ``A = 0.03 U^{-2/3}`` (clipped at 0.9), widths σ 0.5-0.9 px.
    """
    img = np.full((h, w), sky, np.float64)
    n = int(rng.integers(150, 400) * (h * w) / (346 * 260)) + 1
    xs, ys = rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)
    amp = np.minimum(0.03 * rng.uniform(1e-3, 1, n) ** (-2 / 3), 0.9)
    sig = rng.uniform(0.5, 0.9, n)
    r = np.arange(-3, 4)
    px = np.floor(xs)[:, None, None] + r[None, None, :]
    py = np.floor(ys)[:, None, None] + r[None, :, None]
    val = amp[:, None, None] * np.exp(
        -((px - xs[:, None, None]) ** 2 + (py - ys[:, None, None]) ** 2) / (2 * sig[:, None, None] ** 2)
    )
    px, py = np.broadcast_arrays(px, py)
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (val > 1e-3)
    np.add.at(img, (py[ok].astype(np.int64), px[ok].astype(np.int64)), val[ok])
    return np.minimum(img, 1.0)


def _textured(rng: np.random.Generator, h: int, w: int, level: float) -> np.ndarray:
    """Flat ``level`` plus 20-40 rectangles and discs 0.2-0.9 log units brighter or darker,
    anti-aliased (clutter that fires under camera jitter, weaker than the objects)."""
    ss = 2
    canvas = np.full((h * ss, w * ss), level, np.float32)
    for _ in range(int(rng.integers(20, 41))):
        v = float((level + I_DARK) * math.exp(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.9)) - I_DARK)
        cx, cy = rng.uniform(0, w * ss), rng.uniform(0, h * ss)
        r = rng.uniform(5, 40) * ss
        if rng.random() < 0.5:
            cv2.circle(canvas, (int(cx), int(cy)), int(r), v, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(canvas, (int(cx - r), int(cy - r * 0.6)), (int(cx + r), int(cy + r * 0.6)), v, -1)
    return np.clip(cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64), 0.0, 1.0)


def _jitter_fn(rng: np.random.Generator, amp: float) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Camera shake: ``j(t) = A Σ_i a_i sin(2π f_i t + φ_i) / Σ a_i`` per axis, f 1-12 Hz, |j| <= A."""
    f = rng.uniform(1.0, 12.0, (2, 3))
    ph = rng.uniform(0, 2 * math.pi, (2, 3))
    a = rng.uniform(0.3, 1.0, (2, 3))
    a = a / a.sum(1, keepdims=True) * amp

    def j(t_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(t_us, dtype=np.float64)[..., None] * 1e-6
        jx = (a[0] * np.sin(2 * math.pi * f[0] * t + ph[0])).sum(-1)
        jy = (a[1] * np.sin(2 * math.pi * f[1] * t + ph[1])).sum(-1)
        return jx, jy

    return j


# --------------------------------------------------------------------------------------
# the scene
# --------------------------------------------------------------------------------------
class SyntheticScene:
    """A deterministic synthetic DVS recording with labels, produced on demand.

    ``events_until(t)`` returns the events (and int16 labels) of ``[previous t, t)``;
    ``objects_at(t)`` gives the ground-truth objects, ``mask_at(t)`` an id mask,
    ``object_classes()`` the class of every id seen so far.
    """

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.size = SensorSize(cfg.width, cfg.height)
        W, H = cfg.width, cfg.height
        ss = np.random.SeedSequence([cfg.seed, 0x5EED])
        r_bg, r_obj, r_thr, r_noise, r_jit, r_sat = (np.random.default_rng(s) for s in ss.spawn(6))
        self._rng_noise = r_noise
        self._substeps = cfg.batch_us // cfg.substep_us

        # background
        if cfg.scene in ("satellites", "mixed"):
            self.background = _star_sky(r_bg, H, W, r_bg.uniform(0.02, 0.05) if cfg.scene == "satellites" else r_bg.uniform(0.05, 0.08))
        elif cfg.scene == "noise":
            self.background = np.full((H, W), r_bg.uniform(0.1, 0.5))
        elif cfg.scene == "digits" and r_bg.random() < 0.5:
            self.background = np.full((H, W), r_bg.uniform(0.02, 0.1))
        elif r_bg.random() < 0.5:
            self.background = _textured(r_bg, H, W, r_bg.uniform(0.2, 0.5))
        else:
            self.background = np.full((H, W), r_bg.uniform(0.1, 0.6))
        bg_level = float(np.median(self.background))
        self._jitter = _jitter_fn(r_jit, cfg.jitter_px)
        self._pad = int(math.ceil(cfg.jitter_px)) + 2
        self._lbg_pad = np.log(np.pad(self.background, self._pad, mode="edge") + I_DARK)
        self._bg_blocks = _edge_blocks(self._lbg_pad) if cfg.jitter_px > 0 else np.zeros((0, 2), np.int64)

        # per-pixel thresholds with mismatch, hot pixels
        n_pix = W * H
        self.c_on = np.maximum(cfg.contrast_on + cfg.mismatch * r_thr.standard_normal(n_pix), 0.01)
        self.c_off = np.maximum(cfg.contrast_off + cfg.mismatch * r_thr.standard_normal(n_pix), 0.01)
        n_hot = min(cfg.n_hot_pixels, n_pix)
        self.hot_pixels = r_thr.choice(n_pix, n_hot, replace=False).astype(np.int64)
        self.hot_hz = r_thr.uniform(*HOT_HZ, n_hot)

        # objects
        self._next_id = 1
        self._classes: dict[int, int] = {}
        self._objects: list[SceneObject] = []
        n_default = {"satellites": int(r_obj.integers(1, 5)), "shapes": int(r_obj.integers(1, 4)),
                     "digits": int(r_obj.integers(1, 3)), "mixed": int(r_obj.integers(2, 6)), "noise": 0}
        n = cfg.n_objects or n_default[cfg.scene]
        if cfg.scene == "noise":
            n = 0
        n_shapes = {"shapes": n, "mixed": 1}.get(cfg.scene, 0)
        n_digits = n if cfg.scene == "digits" else 0
        n_sats = {"satellites": n, "mixed": max(n - 1, 0)}.get(cfg.scene, 0)
        for _ in range(n_shapes):
            self._add_bouncer(r_obj, "shape", _sprite_shape(r_obj), bg_level)
        for _ in range(n_digits):
            self._add_bouncer(r_obj, "digit", _sprite_digit(r_obj), bg_level)
        # satellites: one slot each; a slot's next satellite is born when the previous has
        # left plus a pause.  Births are processed in time order (heap), so ids do not
        # depend on how the scene is queried.
        self._slots = [np.random.default_rng(s) for s in r_sat.spawn(n_sats)] if n_sats else []
        self._heap: list[tuple[float, int, dict]] = []
        for i, rs in enumerate(self._slots):
            spec = self._draw_satellite(rs, None)
            heapq.heappush(self._heap, (spec["t_birth_us"], i, spec))
        self._ensure(0.0)

        # emulator state (explicit, reset only by building a new scene)
        self._t_us = 0  # emulated up to here
        self._buf_ev: list[np.ndarray] = []
        self._buf_lab: list[np.ndarray] = []
        self._emitted_us = 0
        self._last_ev = np.full(n_pix, -(1 << 62), np.int64)
        self._rank_lut = np.zeros(_MAX_ID + 1, np.int16)
        self._out = _alloc_out(1 << 16)  # reused across batches, doubled when a batch overflows it
        self._mask = np.zeros(n_pix, np.bool_)
        self._all = np.arange(n_pix, dtype=np.int64)
        objs = self._alive(0.0, 0.0)
        log0, top0 = self._render(self._all, objs, np.zeros(1), 0.0)
        self._log_now = log0[0].copy()
        self._ref = log0[0].copy()
        self._id_now = self._ids_from_codes(top0[0], objs)

    # ----- objects ---------------------------------------------------------------------
    def _new_id(self, cls: int) -> int:
        oid = self._next_id
        self._next_id = oid % _MAX_ID + 1
        self._classes[oid] = cls
        return oid

    def _speed_range(self, kind: str) -> tuple[float, float]:
        return tuple(self.cfg.speed_px_s) if self.cfg.speed_px_s is not None else _DEFAULT_SPEEDS[kind]

    def _cls(self, kind: str) -> int:
        return KIND_CLASS[kind] if self.cfg.class_by_kind else 1

    def _add_bouncer(self, rng: np.random.Generator, kind: str, sprite: np.ndarray, bg_level: float) -> None:
        W, H = self.cfg.width, self.cfg.height
        h, w = sprite.shape
        ax, ay = (w - 1) / 2.0, (h - 1) / 2.0
        ys, xs = np.nonzero(sprite > 0)
        # bounce when the footprint touches a border: centre bounds from the footprint extent
        xlo, xhi = ax - xs.min(), W - 1 - (xs.max() - ax)
        ylo, yhi = ay - ys.min(), H - 1 - (ys.max() - ay)
        if xhi < xlo:
            xlo = xhi = (W - 1) / 2.0
        if yhi < ylo:
            ylo = yhi = (H - 1) / 2.0
        speed = rng.uniform(*self._speed_range(kind))
        ang = rng.uniform(0, 2 * math.pi)
        obj = SceneObject(
            id=self._new_id(self._cls(kind)), kind=kind, cls=self._cls(kind), sprite=sprite, anchor=(ax, ay),
            value=_contrasting_value(rng, bg_level), depth=float(rng.uniform(0.5, 1.0)),
            x0=float(rng.uniform(xlo, xhi)), y0=float(rng.uniform(ylo, yhi)),
            vx=speed * math.cos(ang), vy=speed * math.sin(ang), bounce=True, bounds=(xlo, xhi, ylo, yhi),
        )
        self._objects.append(obj)

    def _draw_satellite(self, rng: np.random.Generator, after_us: float | None) -> dict:
        """Draw the next satellite of a slot: a straight line through the frame.

        A point P inside the frame's central 80 % and a direction θ define the line; it
        enters/leaves the frame enlarged by the sprite radius (slab intersection), so the
        satellite is born and dies out of view.  The first of a slot is already mid-way.
        """
        W, H = self.cfg.width, self.cfg.height
        ang = rng.uniform(0, 2 * math.pi)
        sprite, _ = _sprite_satellite(rng, ang)
        margin = sprite.shape[0] / 2.0 + 1
        px, py = rng.uniform(0.1, 0.9) * (W - 1), rng.uniform(0.1, 0.9) * (H - 1)
        dx, dy = math.cos(ang), math.sin(ang)
        ts = []
        for p, d, lo, hi in ((px, dx, -margin, W - 1 + margin), (py, dy, -margin, H - 1 + margin)):
            if abs(d) < 1e-9:
                ts.append((-math.inf, math.inf))
            else:
                a, b = (lo - p) / d, (hi - p) / d
                ts.append((min(a, b), max(a, b)))
        s_in = max(ts[0][0], ts[1][0])
        s_out = min(ts[0][1], ts[1][1])
        speed = max(rng.uniform(*self._speed_range("satellite")), 1.0)
        dur_us = (s_out - s_in) / speed * 1e6
        if after_us is None:
            t_birth = -rng.uniform(0.0, 0.8) * dur_us
        else:
            t_birth = after_us + rng.uniform(0.0, 0.5e6)
        return {
            "sprite": sprite, "x0": px + s_in * dx, "y0": py + s_in * dy, "vx": speed * dx, "vy": speed * dy,
            "t_birth_us": t_birth, "t_death_us": t_birth + dur_us, "value": float(rng.uniform(0.15, 0.9)),
            "depth": float(rng.uniform(0.0, 1.0)),
        }

    def _ensure(self, t_us: float) -> None:
        """Create every satellite born up to ``t_us``, in birth order."""
        while self._heap and self._heap[0][0] <= t_us:
            _, slot, spec = heapq.heappop(self._heap)
            sprite = spec.pop("sprite")
            h, w = sprite.shape
            self._objects.append(
                SceneObject(id=self._new_id(self._cls("satellite")), kind="satellite", cls=self._cls("satellite"),
                            sprite=sprite, anchor=((w - 1) / 2.0, (h - 1) / 2.0), **spec)
            )
            nxt = self._draw_satellite(self._slots[slot], spec["t_death_us"])
            heapq.heappush(self._heap, (nxt["t_birth_us"], slot, nxt))

    def _alive(self, t0: float, t1: float) -> list[SceneObject]:
        """Objects alive at some time in ``[t0, t1]``, far to near; drop the dead for good."""
        self._ensure(t1)
        # forget satellites dead for over a second (kept that long so that objects_at and
        # mask_at still answer for recent events; the list must not grow in endless runs)
        self._objects = [o for o in self._objects if o.t_death_us >= t0 - _KEEP_DEAD_US]
        return sorted((o for o in self._objects if o.t_birth_us <= t1 and o.t_death_us >= t0),
                      key=lambda o: (o.depth, o.id))

    # ----- rendering ---------------------------------------------------------------------
    def _positions(self, objs: list[SceneObject], t_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        jx, jy = self._jitter(t_us)
        px = np.empty((len(objs), len(t_us)))
        py = np.empty((len(objs), len(t_us)))
        for i, o in enumerate(objs):
            px[i], py[i] = o.center(t_us)
        return px + jx, py + jy

    def _scene_args(self, objs: list[SceneObject], t_us: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple:
        """The kernels' scene arguments (background, jitter, sprites, positions) for frames ``t_us``."""
        jx, jy = self._jitter(t_us)
        if objs:
            sprites = np.concatenate([o.sprite.ravel() for o in objs])
            sh = np.array([o.sprite.shape[0] for o in objs], np.int64)
            sw = np.array([o.sprite.shape[1] for o in objs], np.int64)
            off = np.concatenate([[0], np.cumsum(sh * sw)[:-1]]).astype(np.int64)
            ax = np.array([o.anchor[0] for o in objs])
            ay = np.array([o.anchor[1] for o in objs])
            vals = np.array([o.value for o in objs])
        else:
            sprites, vals, ax, ay = np.zeros(1), np.zeros(0), np.zeros(0), np.zeros(0)
            sh = sw = off = np.zeros(0, np.int64)
            px = py = np.zeros((0, len(t_us)))
        return (self.cfg.width, self._lbg_pad, self._pad, np.ascontiguousarray(jx, np.float64),
                np.ascontiguousarray(jy, np.float64), self.cfg.jitter_px > 0, sprites, off, sh, sw, ax, ay,
                np.ascontiguousarray(px, np.float64), np.ascontiguousarray(py, np.float64), vals)

    def _render(self, active: np.ndarray, objs: list[SceneObject], t_us: np.ndarray,
                alpha_min: float) -> tuple[np.ndarray, np.ndarray]:
        """Log frames (K, N) and depth codes (K, N) of pixels ``active`` at times ``t_us``."""
        px, py = self._positions(objs, t_us)
        log_out = np.empty((len(t_us), len(active)))
        top_out = np.empty((len(t_us), len(active)), np.int16)
        _render_kernel(active, *self._scene_args(objs, t_us, px, py), alpha_min, log_out, top_out)
        return log_out, top_out

    def _active(self, objs: list[SceneObject], px: np.ndarray, py: np.ndarray, jx: np.ndarray, jy: np.ndarray) -> np.ndarray:
        """Pixels that may change over the batch (all arrays include the batch start).

        Pixel ``p`` samples sprite block ``floor(p - c + a) = p + m``, ``m = floor(a - c)``;
        alpha at ``p`` can change only if that block is an edge block in some frame, so
        the set is ``{e - m}`` over edge blocks ``e`` and every ``m`` in the batch's range.
        The jittered background is the same with ``m = floor(pad - j)``.
        """
        W, H = self.cfg.width, self.cfg.height
        mask = self._mask
        moving = [(o.edge_blocks, np.floor(o.anchor[0] - px[i]), np.floor(o.anchor[1] - py[i]))
                  for i, o in enumerate(objs)]
        if len(self._bg_blocks):
            moving.append((self._bg_blocks, np.floor(self._pad - jx), np.floor(self._pad - jy)))
        for blocks, mx, my in moving:
            if len(blocks) == 0:
                continue
            ox = np.arange(int(mx.min()), int(mx.max()) + 1)
            oy = np.arange(int(my.min()), int(my.max()) + 1)
            shape = (len(oy), len(ox), len(blocks))
            xs = np.broadcast_to(blocks[:, 0][None, None, :] - ox[None, :, None], shape).ravel()
            ys = np.broadcast_to(blocks[:, 1][None, None, :] - oy[:, None, None], shape).ravel()
            ok = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
            mask[ys[ok] * W + xs[ok]] = True
        active = np.flatnonzero(mask)
        mask[active] = False
        return active.astype(np.int64)

    def _ids_from_codes(self, codes: np.ndarray, objs: list[SceneObject]) -> np.ndarray:
        lut = np.zeros(len(objs) + 1, np.int16)
        lut[1:] = [o.id for o in objs]
        return lut[codes]

    # ----- emulation ---------------------------------------------------------------------
    def _batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Emulate one batch ``[t0, t0 + batch_us)``; returns sorted events and labels."""
        cfg = self.cfg
        K, S = self._substeps, cfg.substep_us
        t0 = self._t_us
        times = t0 + S * np.arange(K + 1, dtype=np.float64)
        objs = self._alive(times[0], times[-1])
        px, py = self._positions(objs, times)
        active = self._active(objs, px, py, *self._jitter(times))

        ts = np.zeros(0, np.int64)
        pix = np.zeros(0, np.int64)
        pol = np.zeros(0, np.int8)
        lab = np.zeros(0, np.int16)
        if len(active):
            # previous labels (ids) -> this batch's depth codes; gone objects -> 0
            lut = self._rank_lut
            ids = np.array([o.id for o in objs], np.int64)
            lut[ids] = np.arange(1, len(objs) + 1, dtype=np.int16)
            code_in = lut[self._id_now[active]]
            lut[ids] = 0
            log_in = self._log_now[active]
            ref_in = self._ref[active]
            args = self._scene_args(objs, times[1:], px[:, 1:], py[:, 1:])
            while True:
                log_now, code_now = log_in.copy(), code_in.copy()  # updated in place by the kernel
                n_ev = _emulate_kernel(active, *args, log_now, code_now, self._ref, self.c_on, self.c_off, t0, S,
                                       *self._out)
                if n_ev <= len(self._out[0]):
                    break
                # rare: more events than room; undo the reference levels and redo larger
                self._ref[active] = ref_in
                self._out = _alloc_out(2 * n_ev)
            ts, pix, pol, code = (a[:n_ev].copy() for a in self._out)
            lab = self._ids_from_codes(code, objs)
            self._log_now[active] = log_now
            self._id_now[active] = self._ids_from_codes(code_now, objs)

        # background activity and hot pixels: Poisson counts, uniform times, label 0
        rng = self._rng_noise
        n_pix = cfg.width * cfg.height
        t1 = t0 + K * S
        n_ba = int(rng.poisson(cfg.noise_hz * n_pix * (t1 - t0) * 1e-6)) if cfg.noise_hz > 0 else 0
        hot_n = rng.poisson(self.hot_hz * (t1 - t0) * 1e-6) if len(self.hot_pixels) else np.zeros(0, np.int64)
        n_noise = n_ba + int(hot_n.sum())
        if n_noise:
            npix = np.concatenate([rng.integers(0, n_pix, n_ba), np.repeat(self.hot_pixels, hot_n)])
            nts = rng.integers(t0, t1, n_noise)
            npol = rng.integers(0, 2, n_noise).astype(np.int8)
            ts = np.concatenate([ts, nts])
            pix = np.concatenate([pix, npix])
            pol = np.concatenate([pol, npol])
            lab = np.concatenate([lab, np.zeros(n_noise, np.int16)])

        order = np.lexsort((pix, ts))  # time, then pixel: a deterministic total order
        ts, pix, pol, lab = ts[order], pix[order], pol[order], lab[order]
        keep = _refractory_kernel(ts, pix, self._last_ev, cfg.refractory_us)
        ev = np.empty(int(keep.sum()), EVENT_DTYPE)
        ev["timestamp"] = ts[keep]
        ev["x"] = pix[keep] % cfg.width
        ev["y"] = pix[keep] // cfg.width
        ev["polarity"] = pol[keep]
        self._t_us = t1
        return ev, lab[keep]

    def events_until(self, t_end_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Events with ``previous t_end <= timestamp < t_end_us`` (sorted) and their labels."""
        if t_end_us < self._emitted_us:
            raise ValueError(f"t_end_us={t_end_us} is before the last call's {self._emitted_us}; time only moves on")
        while self._t_us < t_end_us:
            ev, lab = self._batch()
            self._buf_ev.append(ev)
            self._buf_lab.append(lab)
        # dtype= keeps dv-processing's padded layout (numpy would otherwise pack the fields)
        ev = concat_events(self._buf_ev) if self._buf_ev else np.zeros(0, EVENT_DTYPE)
        lab = np.concatenate(self._buf_lab) if self._buf_lab else np.zeros(0, np.int16)
        cut = int(np.searchsorted(ev["timestamp"], t_end_us, side="left"))
        self._buf_ev, self._buf_lab = [ev[cut:]], [lab[cut:]]
        self._emitted_us = t_end_us
        return ev[:cut], lab[:cut]

    # ----- ground truth ------------------------------------------------------------------
    def object_classes(self) -> dict[int, int]:
        """Class (>= 1) of every object id created so far."""
        return dict(self._classes)

    def objects_at(self, t_us: float) -> list[ObjectState]:
        """Objects present at ``t_us`` (image positions with jitter; off-frame ones included)."""
        objs = self._alive_at(t_us)
        px, py = self._positions(objs, np.array([float(t_us)]))
        out = []
        for i, o in enumerate(objs):
            ys, xs = np.nonzero(o.sprite > 0)
            # pixel p touched iff p - c + a lies within (xs.min()-1, xs.max()+1)
            x0 = int(math.floor(px[i, 0] - o.anchor[0] + xs.min() - 1)) + 1
            x1 = int(math.ceil(px[i, 0] - o.anchor[0] + xs.max() + 1)) - 1
            y0 = int(math.floor(py[i, 0] - o.anchor[1] + ys.min() - 1)) + 1
            y1 = int(math.ceil(py[i, 0] - o.anchor[1] + ys.max() + 1)) - 1
            out.append(ObjectState(o.id, o.cls, o.kind, float(px[i, 0]), float(py[i, 0]), (x0, y0, x1, y1)))
        return out

    def _alive_at(self, t_us: float) -> list[SceneObject]:
        self._ensure(t_us)
        return sorted((o for o in self._objects if o.t_birth_us <= t_us <= o.t_death_us), key=lambda o: (o.depth, o.id))

    def mask_at(self, t_us: float, alpha_min: float = 0.5) -> np.ndarray:
        """(H, W) int16 id of the nearest object with alpha >= ``alpha_min`` at each pixel (0 = none).

        Valid for ``t_us`` no earlier than one second before the emulated time (satellites
        dead for longer are forgotten); the same holds for :meth:`objects_at`.
        """
        objs = self._alive_at(t_us)
        _, top = self._render(self._all, objs, np.array([float(t_us)]), alpha_min)
        return self._ids_from_codes(top[0], objs).reshape(self.cfg.height, self.cfg.width)


# --------------------------------------------------------------------------------------
# the source node
# --------------------------------------------------------------------------------------
class SyntheticSource(SourceNode):
    """Streams a :class:`SyntheticScene` as packets of ``packet_us`` sensor time.

    Packet ``i`` covers ``[i P, (i+1) P)`` (the last one is cut at the duration); when
    ``realtime`` it is emitted at ``start_wall + t_end / 1e6`` on the injected clock.
    """

    name = "synthetic"

    def __init__(self, cfg: SyntheticConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.live = cfg.realtime
        self.clock: Clock = clock if clock is not None else WallClock()
        self._size = SensorSize(cfg.width, cfg.height)
        self._stop: threading.Event | None = None
        self.scene: SyntheticScene | None = None

    @property
    def size(self) -> SensorSize:
        return self._size

    def describe(self) -> str:
        return f"synthetic:{self.cfg.scene} seed={self.cfg.seed} {self._size}"

    def open(self, ctx: RunContext) -> None:
        self._stop = ctx.stop
        self.scene = SyntheticScene(self.cfg)  # a fresh scene per open: same seed, same stream

    def close(self) -> None:
        self._stop = None

    def object_classes(self) -> dict[int, int]:
        """Class of every object id emitted so far (see :meth:`SyntheticScene.object_classes`)."""
        return self.scene.object_classes() if self.scene is not None else {}

    def packets(self) -> Iterator[EventPacket]:
        if self.scene is None or self._stop is None:
            raise NodeError("synthetic source used before open(); the engine must call open(ctx) first")
        scene, stop, cfg = self.scene, self._stop, self.cfg
        end_us = int(round(cfg.duration_s * 1e6)) if cfg.duration_s > 0 else None
        start_wall = self.clock.now()
        t = 0
        while not stop.is_set() and (end_us is None or t < end_us):
            t_end = t + cfg.packet_us if end_us is None else min(t + cfg.packet_us, end_us)
            ev, lab = scene.events_until(t_end)
            if cfg.realtime:
                self.clock.sleep_until(start_wall + t_end / 1e6, stop)
                if stop.is_set():
                    return
            yield EventPacket(ev, self._size, t_end, labels=lab)
            t = t_end


def benchmark_scenes() -> list[tuple[str, SyntheticConfig]]:
    """The fixed held-out benchmark: seeds >= 1000 (never for training), 2 s each, 346x260."""
    base = SyntheticConfig(duration_s=2.0, width=346, height=260)
    specs = [
        ("sat_calm", "satellites", 1000, 0.0),
        ("sat_jitter", "satellites", 1001, 1.5),
        ("shapes_calm", "shapes", 1002, 0.0),
        ("shapes_jitter", "shapes", 1003, 1.0),
        ("digits", "digits", 1004, 0.0),
        ("mixed", "mixed", 1005, 0.0),
        ("noise", "noise", 1006, 0.0),
    ]
    return [(name, dataclasses.replace(base, scene=scene, seed=seed, jitter_px=j)) for name, scene, seed, j in specs]


@register_source(
    "synthetic",
    "built-in DVS emulation: satellites over stars, moving shapes and digits, with exact labels",
    "synthetic or synthetic:satellites",
)
def make_synthetic(arg: str | None, cfg: Config) -> SyntheticSource:
    """``synthetic`` uses ``cfg["synthetic"]``; ``synthetic:SCENE`` overrides its scene."""
    sc: SyntheticConfig = cfg["synthetic"]
    if arg:
        if arg not in SCENES:
            raise UsageError(f"unknown synthetic scene {arg!r}; valid scenes: {', '.join(SCENES)} (e.g. synthetic:satellites)")
        sc = dataclasses.replace(sc, scene=arg)
    return SyntheticSource(sc)


def measure_speed(cfg: SyntheticConfig, seconds: float = 2.0) -> dict[str, float]:
    """Emulate ``seconds`` of sensor time single-threaded; returns events, events/s and
    × real time, both on wall and on process CPU time (the latter is robust to a busy machine)."""
    import time

    scene = SyntheticScene(cfg)
    scene.events_until(cfg.batch_us)  # warm up (numba cache load, first batch)
    w0, c0 = time.perf_counter(), time.process_time()
    ev, lab = scene.events_until(cfg.batch_us + int(seconds * 1e6))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"events": float(len(ev)), "labelled": float((lab > 0).sum()), "events_per_s_sensor": len(ev) / seconds,
            "x_realtime_wall": seconds / wall, "x_realtime_cpu": seconds / cpu, "events_per_s_cpu": len(ev) / cpu}

