"""Event-driven SpikeSEG: the dense equations of ``model/encoder.py`` and ``model/decoder.py``
computed only where input landed, with spikes identical to the dense path.

Per step, with the same symbols as the encoder docstring::

    I1 = conv2d(x, W1, padding=2)      S1, V1 = LIF(I1)      P1, idx1 = maxpool2(S1)
    I2 = conv2d(P1, W2, padding=2)     S2, V2 = LIF(I2)      P2, idx2 = maxpool2(S2)
    I3 = conv2d(P2, W3, padding=3)     S3, V3 = IF(I3)
    mask = decoder(S3, idx2, idx1 [, S2, S1 gate])

Why it is exact and cheap (PERF-NOTES):

* **Scatter instead of conv.**  ``I[o] = sum_i W[o - i] x[i]`` is accumulated from the
  non-zero inputs only: each active input adds its kernel into a float64 buffer.  The
  neurons so touched are the only ones whose current is non-zero.
* **Lazy leak.**  A neuron without input only leaks: subtractive ``V <- max(V - lambda, 0)``,
  multiplicative ``V <- beta V``; neither can lift ``V`` to ``theta > 0`` (V < theta after a
  step, and ``beta <= 1``, ``lambda >= 0``).  So an untouched neuron never spikes and its
  update can wait until it is next touched.  Then the missed leak steps are replayed so
  that the float32 result is bit-identical to the dense per-step updates: in closed form
  ``max(v - k lambda, 0)`` where that is exact in float32 (lambda a multiple of ulp(v), see
  :func:`exact_leak_limit`; always for lambda = 1 or 9), else one step at a time,
  stopping as soon as ``V == 0`` (multiplicative: ``V <- beta V`` k times).
* **Pooling from spikes.**  ``P[c, py, px] = 1`` iff a spike lies in the window; torch's
  index is the first spike in row-major window order, else the window's top-left (all-zero
  window: the first element wins the tie).  Only spiking windows are stored.
* **Decoder from Conv3 spikes.**  The decoder is linear in S3, so the saliency is a scatter
  of ``W3`` at each S3 spike, unpooled through the stored window offsets (gated: only
  spiking windows survive, at their first spike), scattered through ``W2``, unpooled,
  scattered through ``sum_cin W1``.  No S3 spike: empty mask, no work.  Values are exact
  sums (float64), not reachability, because W1 is signed (zero-mean Gabor/DoG kernels):
  "saliency > 0" is not "reachable" at the last stage.

Float arithmetic (the contract with the dense path):

* currents are summed in float64 and rounded once to float32; membranes, leaks and
  thresholds are float32 with the dense path's operation order (``(V + I) - lambda``,
  ``I + beta V``).  Spikes are therefore bit-identical whenever the dense float32 conv
  returns the correctly rounded sum, which holds whenever every partial sum is exact in
  float32 (e.g. weights on a 2^-12 grid with sums < 2^11).  Otherwise float32 conv and this
  path may differ in the last bit of I, which flips a spike only if ``V + I - lambda`` lies
  within a few ulps (~1e-6 relative) of ``theta``; the tests measure it (zero flips seen).
* weights are on the 2^-12 grid (:func:`model.encoder.quantize_weights`, applied when an
  encoder is built, loaded or adapted): every encoder sum is then exact in float32 and
  every decoder sum exact in float64, here and in the dense decoders (which sum in
  float64 too), so spikes and masks are identical whatever the order of summation --
  also where the signed W1 cancels the saliency to exactly 0.  ``decoder_eps`` stays at
  its default 0 (kept only for callers that want a band above the threshold).
* decoding: the joint mask by :func:`_decode`; per-spike supports (HULK) by
  :func:`_support_one` (gated: gathers D2 at the pooled Conv1 cells that spiked, ~3 us
  per spike at 346x260) or :func:`_decode` (ungated).

State (:class:`SparseState`) is explicit and channels-last; :meth:`SparseSpikeSEG.step`
updates its arrays **in place** and returns it (copying 4 x H x W membranes per step would
cost more than the step); a fresh state is ``None``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir as _ir
from numba import njit, types as _nbtypes
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

LEAK_CODES = {"subtractive": 0, "multiplicative": 1, "none": 2}

#: The decoders' W2 taps and W3 / D3 channel rows as integers in units of 2^-12 (the weight
#: grid, :func:`model.encoder.quantize_weights`), int16, 36 channels padded to 48 (three
#: 16-lane vectors): a (pool2 cell, pooled Conv1 cell) block is 4 features x 48 channels,
#: a P1 position's slot its nine blocks.  Their dot products (:func:`_dot4`) are integer
#: sums in units of 2^-24, exact, converted to float64 once (``* _UNIT``: exact too).
_CP = 48
_QB = 4 * _CP
BLOCK_SLOT = 9 * _QB
_UNIT = 2.0**-24
#: the joint mask's D3 (<= 49 x 4096 < 2^18) as two int16 halves, ``(hi << _D3_SHIFT) + lo``
_D3_SHIFT = 9
_D3_LOW = (1 << _D3_SHIFT) - 1


def _load16(builder: _ir.IRBuilder, ptr: _ir.Value, off: int) -> _ir.Value:
    """16 int16 from ``ptr + off`` (unaligned) as one vector."""
    at = builder.gep(ptr, [_ir.Constant(_ir.IntType(64), off)])
    v = builder.load(builder.bitcast(at, _ir.VectorType(_ir.IntType(16), 16).as_pointer()))
    v.align = 2
    return v


@_intrinsic
def _dot4(typingctx: Any, x: Any, xo: Any, blk: Any, bo: Any) -> Any:
    """``(sum_ci x[xo + ci] * blk[bo + 48 c + ci] for c in 0..3)`` over ci < 48, int64 each.

    ``x``, ``blk``: 1-D int16 arrays; no bounds checks (the caller's layout guarantees them).
    Written as vector IR: sign-extend 16 lanes, multiply, add even and odd lanes -- the
    pattern x86 lowers to one ``vpmaddwd`` (16 products, 8 pair sums; other targets get their
    own widening multiply-adds), so a 4 x 48 block is 12 of those, against 144 scalar float64
    multiply-adds before (8x fewer cycles in a microbenchmark).  Exact for ``blk`` in
    [0, 4096] (W2 taps) and any int16 ``x``: each of the 8 int32 lanes sums 6 products of
    magnitude < 2^15 x 2^12 (< 2^30), and the lanes are summed in int64.
    """
    i16 = _nbtypes.int16
    if not (isinstance(x, _nbtypes.Array) and isinstance(blk, _nbtypes.Array) and x.dtype == i16
            and blk.dtype == i16 and x.ndim == 1 and blk.ndim == 1
            and isinstance(xo, _nbtypes.Integer) and isinstance(bo, _nbtypes.Integer)):
        return None
    sig = _nbtypes.UniTuple(_nbtypes.int64, 4)(x, xo, blk, bo)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = _ir.IntType(32)
        v16 = _ir.VectorType(i32, 16)
        v8 = _ir.VectorType(i32, 8)
        even = _ir.Constant(v8, [2 * i for i in range(8)])
        odd = _ir.Constant(v8, [2 * i + 1 for i in range(8)])
        px = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        pb = builder.gep(context.make_array(signature.args[2])(context, builder, args[2]).data, [args[3]])
        i64 = _ir.IntType(64)
        v8l = _ir.VectorType(i64, 8)
        red = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(i64, [v8l]),
                                             "llvm.vector.reduce.add.v8i64")
        xs = [builder.sext(_load16(builder, px, 16 * j), v16) for j in range(3)]
        out = []
        for c in range(4):
            acc = None
            for j in range(3):
                m = builder.mul(xs[j], builder.sext(_load16(builder, pb, _CP * c + 16 * j), v16))
                pair = builder.add(builder.shuffle_vector(m, m, even), builder.shuffle_vector(m, m, odd))
                acc = pair if acc is None else builder.add(acc, pair)
            out.append(builder.call(red, [builder.sext(acc, v8l)]))
        return context.make_tuple(builder, signature.return_type, out)

    return sig, codegen


# --------------------------------------------------------------------------- kernels
#: Index cast for hot loops: numba adds a negative-index wraparound (a sign test and an add) to
#: every access with a signed index, which blocks vectorisation (the Conv2 scatter ran 2x
#: slower).  Unsigned indices skip it.  Only for indices that are valid by construction (there
#: are no bounds checks either way).  Cast the finished index; never mix uint64 into the
#: arithmetic (numba turns int64 op uint64 into a float).
_U = np.uint64

#: Conv2's scatter accumulates into ``cur`` by slot (the position's index in the step's touched
#: list), not by position: the currents of a step then lie in nt x 36 contiguous floats that
#: stay in cache, instead of 144-byte rows spread over a 3.2 MB map (346x260) that the
#: scatter and the update each missed.  ``mark`` holds ``(t << _SLOT_BITS) | slot`` (``t``: steps
#: since reset, so no overflow before 2^37 steps).
_SLOT_BITS = 26
_SLOT_MASK = (1 << _SLOT_BITS) - 1

@njit(cache=True, nogil=True)
def _active_from_frame(
    frame: np.ndarray, bits: np.ndarray, hw: int, binary: bool, pos: np.ndarray, ch: np.ndarray, val: np.ndarray
) -> int:
    """Non-zero entries of a flat (C*H*W) float32 frame as (flat y*W+x, channel, value); returns the count.

    ``bits`` is the same memory viewed as uint64: blocks of 16 floats whose bits are all
    zero are skipped with 8 word tests (event frames are >= 95 % zeros); -0.0 has a bit set
    and is then rejected by the value test.
    """
    n = 0
    nw = bits.shape[0]
    blk = 8
    for b0 in range(0, nw, blk):
        b1 = min(b0 + blk, nw)
        acc = np.uint64(0)
        for j in range(b0, b1):
            acc |= bits[j]
        if acc == 0:
            continue
        for i in range(2 * b0, 2 * b1):
            v = frame[i]
            keep = v > 0 if binary else v != 0
            if keep:
                c = i // hw
                pos[n] = i - c * hw
                ch[n] = c
                val[n] = np.float32(1.0) if binary else v
                n += 1
    return n


@njit(cache=True, nogil=True)
def _active_from_events(
    xs: np.ndarray, ys: np.ndarray, ps: np.ndarray, c_n: int, h: int, w: int, binary: bool,
    count: np.ndarray, pos: np.ndarray, ch: np.ndarray, val: np.ndarray,
) -> int:
    """Events -> the same active list as the frame of counts would give (``count`` is zero scratch)."""
    n = 0
    for i in range(xs.shape[0]):
        x = np.int64(xs[i])
        y = np.int64(ys[i])
        if x < 0 or y < 0 or x >= w or y >= h:
            continue
        c = np.int64(ps[i]) if c_n == 2 else np.int64(0)
        o = (y * w + x) * c_n + c
        if count[o] == 0:
            pos[n] = y * w + x
            ch[n] = c
            n += 1
        count[o] += 1
    for j in range(n):
        o = pos[j] * c_n + ch[j]
        val[j] = np.float32(1.0) if binary else np.float32(count[o])
        count[o] = 0
    return n


@njit(cache=True, nogil=True, inline="always")
def _replay(v32: np.float32, k: int, mode: int, lam: np.float32, beta: np.float32, exact_below: np.float32) -> np.float32:
    """Membrane after ``k`` input-free steps, exactly as the dense path computes them step by step."""
    zero = np.float32(0.0)
    if mode == 0 and lam > 0 and k > 0 and v32 > zero and v32 < exact_below:
        # closed form, exact here: lambda is a multiple of ulp(v), so every replayed
        # subtraction is exact and k of them equal one subtraction of k * lambda
        r = np.float64(v32) - np.float64(k) * np.float64(lam)
        return np.float32(r) if r > 0 else zero
    if mode == 0 and lam > 0:
        for _ in range(k):
            if v32 <= zero:
                break
            v32 = v32 - lam
            if v32 < zero:
                v32 = zero
    elif mode == 1 and beta < 1:
        for _ in range(k):
            if v32 == zero:
                break
            v32 = np.float32(np.float64(beta) * np.float64(v32))
    return v32


@njit(cache=True, nogil=True, inline="always")
def _integrate(v32: np.float32, i32: np.float32, mode: int, lam: np.float32, beta: np.float32) -> np.float32:
    """This step's update of a (replayed) membrane with current ``i32``, before the threshold."""
    zero = np.float32(0.0)
    if mode == 0:
        v32 = (v32 + i32) - lam
        if v32 < zero:
            v32 = zero
    elif mode == 1:
        # torch.add(i, v, alpha=beta) is a fused multiply-add on CPU: beta*v is exact
        # in float64, one more rounding for the sum (double rounding: see module doc)
        v32 = np.float32(np.float64(i32) + np.float64(beta) * np.float64(v32))
    else:
        v32 = v32 + i32
    return v32


#: the index of the single set bit of a uint64 ``b``: ``_DEBRUIJN[(b * _DEBRUIJN_MUL) >> 58]``
_DEBRUIJN_MUL = np.uint64(0x022FDD63CC95386D)
_DEBRUIJN = np.zeros(64, np.int64)
for _i in range(64):
    _DEBRUIJN[int(((1 << _i) * 0x022FDD63CC95386D) % (1 << 64)) >> 58] = _i
del _i


@njit(cache=True, nogil=True)
def _layer(
    src_pos: np.ndarray, src_ch: np.ndarray, src_val: np.ndarray, n_src: int, wi: int,
    wt: np.ndarray, pad: int, ho: int, wo: int,
    cur: np.ndarray, v_mem: np.ndarray, last: np.ndarray, fired: np.ndarray, mark: np.ndarray,
    touched: np.ndarray, t: int, theta: np.ndarray, mode: int, lam: np.float32, beta: np.float32,
    exact_below: np.float32, fire_once: bool, spikes: np.ndarray,
) -> int:
    """One conv + neuron layer, event-driven; returns the number of spikes written to ``spikes``.

    Scatter: ``I[oy, ox, co] += val * W[co, ci, ky, kx]`` at ``oy = y - ky + pad`` (conv2d
    semantics), float32 (exact: binary inputs, weights on the 2^-12 grid in [0, 1], at most
    1,764 terms), for every active input.  ``wt`` is W as float32 (ci, K, K, co) so
    the innermost loop runs over contiguous output channels.  Touched 2-D positions are
    listed once per step (``mark`` holds the step count and the position's slot, and
    ``cur`` is by slot: row j of ``cur`` is ``touched[j]``'s, see ``_SLOT_BITS``; one output
    channel: :func:`_layer_one`).  Then at touched positions only: replay the
    missed leak steps, apply this step's update in float32, threshold, reset.  Below
    ``exact_below`` (see :func:`exact_leak_limit`) the replay is done in closed form.
    Spikes are flat channels-last indices ``(oy * wo + ox) * C + co``.
    """
    co_n = wt.shape[3]
    k_n = wt.shape[1]
    wf = wt.reshape(-1)
    nt = 0
    for s in range(n_src):
        p = src_pos[s]
        y = p // wi
        x = p - y * wi
        ci = src_ch[s]
        v = src_val[s]
        for ky in range(k_n):
            oy = y - ky + pad
            if oy < 0 or oy >= ho:
                continue
            for kx in range(k_n):
                ox = x - kx + pad
                if ox < 0 or ox >= wo:
                    continue
                o = oy * wo + ox
                m = mark[_U(o)]
                # branch-free listing, as in _layer_c1 (``touched`` has one entry of slack)
                new = (m >> _SLOT_BITS) != t
                m = (t << _SLOT_BITS) | nt if new else m
                mark[_U(o)] = m
                touched[_U(nt)] = o
                nt += np.int64(new)
                base = (m & _SLOT_MASK) * co_n
                wb = ((ci * k_n + ky) * k_n + kx) * co_n
                for co in range(co_n):
                    cur[_U(base + co)] += v * wf[_U(wb + co)]
    zero = np.float32(0.0)
    ns = 0
    # fast path (subtractive leak, closed-form replay exact for every membrane, no fire-once):
    # the channel loop is branch-free so it vectorises; spikes are collected afterwards only
    # where one fired.  Membranes after an update are < theta (or reset), so closed form is
    # exact for all of them when exact_below >= max(theta).  Same float ops as the loop below.
    th_max = zero
    for co in range(co_n):
        th_max = max(th_max, theta[co])
    fast = mode == 0 and not fire_once and (lam == 0 or exact_below >= th_max)
    fire = np.zeros(co_n, np.bool_)
    lam64 = np.float64(lam)
    for j in range(nt if fast else 0):
        o = touched[j]
        k = t - 1 - last[o]
        last[o] = t
        base = o * co_n
        cb = j * co_n
        kl = np.float64(max(k, 0)) * lam64
        n_fire = 0
        for co in range(co_n):
            e = _U(base + co)
            ec = _U(cb + co)
            r = np.float64(v_mem[e]) - kl
            v32 = np.float32(r) if r > 0.0 else zero
            i32 = np.float32(cur[ec])
            cur[ec] = 0.0
            v32 = (v32 + i32) - lam
            v32 = v32 if v32 > zero else zero
            f = v32 >= theta[_U(co)]
            fire[_U(co)] = f
            n_fire += f
            v_mem[e] = zero if f else v32
        if n_fire:
            # branch-free compaction: ~17 % of Conv2's neurons fire on the scene, so a branch
            # per channel mispredicted several times per position (``spikes`` has ``co_n``
            # entries of slack for the last unconditional store)
            for co in range(co_n):
                spikes[_U(ns)] = base + co
                ns += np.int64(fire[_U(co)])
    for j in range(0 if fast else nt):
        o = touched[j]
        k = t - 1 - last[o]
        last[o] = t
        base = o * co_n
        cb = j * co_n
        for co in range(co_n):
            e = base + co
            v32 = _replay(v_mem[e], k, mode, lam, beta, exact_below)
            i32 = np.float32(cur[cb + co])
            cur[cb + co] = 0.0
            v32 = _integrate(v32, i32, mode, lam, beta)
            if v32 >= theta[co] and not (fire_once and fired[e] != 0):
                spikes[ns] = e
                ns += 1
                v32 = zero
                if fire_once:
                    fired[e] = 1
            v_mem[e] = v32
    return ns


@njit(cache=True, nogil=True)
def _layer_one(
    src_pos: np.ndarray, src_ch: np.ndarray, src_val: np.ndarray, n_src: int, wi: int,
    wt: np.ndarray, pad: int, ho: int, wo: int,
    cur: np.ndarray, v_mem: np.ndarray, last: np.ndarray, fired: np.ndarray,
    t: int, theta: np.ndarray, mode: int, lam: np.float32, beta: np.float32,
    exact_below: np.float32, fire_once: bool, spikes: np.ndarray,
) -> int:
    """:func:`_layer` for ONE output channel (Conv3 with one class): same spikes, in raster order.

    The kernels of all active channels at one input position are summed first (the list is
    grouped by position, see :func:`_pool`) and added once into the dense current map
    ``cur`` (by position), without marks: the touched positions are the input positions
    dilated by the kernel's reach, computed on row bit masks (a 7 x 7 dilation is 7 ORs per
    word and six shifts), and visited in raster order for the update.  The per-add mark test
    of :func:`_layer` was ~60 % of this layer.  Same sums in another order: exact on the
    2^-12 weight grid.  Input positions must lie inside the ``ho`` x ``wo`` grid (pooled
    positions do; the stride is 1 and ``pad = K // 2``).
    """
    k_n = wt.shape[1]
    kk = k_n * k_n
    wf = wt.reshape(-1)
    nw = (wo + 63) // 64 + 1  # words per bit row, one spare for the shifts
    rows = np.zeros((ho + 2 * pad, nw), np.uint64)  # input positions, rows padded by ``pad``
    ksum = np.zeros(kk, np.float32)
    one = np.uint64(1)
    s = 0
    while s < n_src:
        p = src_pos[s]
        for j in range(kk):
            ksum[j] = 0.0
        while s < n_src and src_pos[s] == p:
            wb = src_ch[s] * kk
            v = src_val[s]
            for j in range(kk):
                ksum[_U(j)] += v * wf[_U(wb + j)]
            s += 1
        y = p // wi
        x = p - y * wi
        rows[_U(y + pad), _U(x >> 6)] |= one << np.uint64(x & 63)
        kx_lo = max(0, x + pad - wo + 1)  # ox = x - kx + pad in [0, wo)
        kx_hi = min(k_n, x + pad + 1)
        for ky in range(max(0, y + pad - ho + 1), min(k_n, y + pad + 1)):
            ob = (y - ky + pad) * wo + x + pad
            kb = ky * k_n
            for kx in range(kx_lo, kx_hi):
                cur[_U(ob - kx)] += ksum[_U(kb + kx)]
    acc = np.zeros(nw, np.uint64)
    tail = np.uint64(wo & 63)
    last_mask = (one << tail) - one if tail else ~np.uint64(0)  # bits of the last word inside the grid
    zero32 = np.float32(0.0)
    ns = 0
    for oy in range(ho):
        any_bits = np.uint64(0)
        for wd in range(nw):
            a = np.uint64(0)
            for dy in range(2 * pad + 1):  # rows oy - pad .. oy + pad (padded index oy .. oy + 2 pad)
                a |= rows[_U(oy + dy), _U(wd)]
            acc[_U(wd)] = a
            any_bits |= a
        if any_bits == 0:
            continue
        for wd in range(nw - 1):  # horizontal dilation by +-pad; then keep columns < wo
            a = acc[_U(wd)]
            lo_w = acc[_U(wd - 1)] if wd > 0 else np.uint64(0)
            hi_w = acc[_U(wd + 1)]
            d = a
            for sh in range(1, pad + 1):
                ush = np.uint64(sh)
                d |= (a << ush) | (lo_w >> (np.uint64(64) - ush))
                d |= (a >> ush) | (hi_w << (np.uint64(64) - ush))
            if wd == nw - 2:
                d &= last_mask
            rb = oy * wo + wd * 64
            while d:
                low = d & (~d + one)
                d ^= low
                o = rb + _DEBRUIJN[_U((low * _DEBRUIJN_MUL) >> np.uint64(58))]
                k = t - 1 - last[_U(o)]
                last[_U(o)] = t
                v32 = _replay(v_mem[_U(o)], k, mode, lam, beta, exact_below)
                i32 = cur[_U(o)]
                cur[_U(o)] = zero32
                v32 = _integrate(v32, i32, mode, lam, beta)
                if v32 >= theta[0] and not (fire_once and fired[_U(o)] != 0):
                    spikes[ns] = o
                    ns += 1
                    v32 = zero32
                    if fire_once:
                        fired[_U(o)] = 1
                v_mem[_U(o)] = v32
    return ns


# Conv1 neuron state, one 64-byte record (one cache line) per pixel: the scatter and the update
# of a touched pixel then miss the cache once, not four times (separate cur / v / last / mark
# arrays).  Conv1 input is scattered events, so its pixels are touched all over the frame.
C1_DTYPE = np.dtype([("cur", np.float64, (4,)), ("v", np.float32, (4,)), ("last", np.int64), ("mark", np.int64)],
                    align=True)


@njit(cache=True, nogil=True)
def _layer_c1(
    src_pos: np.ndarray, src_ch: np.ndarray, src_val: np.ndarray, n_src: int, wi: int,
    wt: np.ndarray, ho: int, wo: int, rec: np.ndarray, fired: np.ndarray, touched: np.ndarray, t: int,
    theta: np.ndarray, mode: int, lam: np.float32, beta: np.float32, exact_below: np.float32,
    fire_once: bool, spikes: np.ndarray,
) -> int:
    """:func:`_layer` for Conv1 (5 x 5, padding 2, four output channels) on :data:`C1_DTYPE` records.

    Same sums (float64, exact on the 2^-12 grid) and the same float32 neuron update
    (:func:`_replay`, :func:`_integrate`); spikes are flat channels-last ``o * 4 + c``.
    """
    nt = 0
    for s in range(n_src):
        p = src_pos[s]
        y = p // wi
        x = p - y * wi
        ci = src_ch[s]
        v = np.float64(src_val[s])
        for ky in range(5):
            oy = y - ky + 2
            if oy < 0 or oy >= ho:
                continue
            for kx in range(5):
                ox = x - kx + 2
                if ox < 0 or ox >= wo:
                    continue
                o = oy * wo + ox
                r = rec[_U(o)]
                # branch-free listing (~2/3 of the adds reach a new pixel: a branch mispredicts
                # often); ``touched`` has one entry of slack for the unconditional store
                new = r.mark != t
                r.mark = t
                touched[_U(nt)] = o
                nt += np.int64(new)
                for co in range(4):
                    r.cur[_U(co)] += v * wt[_U(ci), _U(ky), _U(kx), _U(co)]
    zero = np.float32(0.0)
    ns = 0
    # Subtractive leak without fire-once: a membrane is < theta after every update, and each
    # replayed step subtracts lambda (to within an ulp), so after cap = ceil(theta_max /
    # lambda) + 1 steps it is 0 and stays 0.  Replaying min(k, cap) steps of max(v - lambda, 0)
    # on the four channels at once, without the per-channel early exit, is the same float32
    # sequence with no data-dependent branches (lambda 1.6 is not exact in closed form).
    th_max = zero
    for co in range(4):
        th_max = max(th_max, theta[co])
    capped = mode == 0 and lam > 0 and not fire_once
    cap = int(math.ceil(np.float64(th_max) / (np.float64(lam) * (1.0 - 1e-6)))) + 1 if capped else 0
    for j in range(nt):
        o = touched[j]
        r = rec[_U(o)]
        k = t - 1 - r.last
        r.last = t
        if capped:
            a0 = r.v[0]
            a1 = r.v[1]
            a2 = r.v[2]
            a3 = r.v[3]
            for _ in range(min(k, cap)):
                a0 = a0 - lam
                a1 = a1 - lam
                a2 = a2 - lam
                a3 = a3 - lam
                a0 = a0 if a0 > zero else zero
                a1 = a1 if a1 > zero else zero
                a2 = a2 if a2 > zero else zero
                a3 = a3 if a3 > zero else zero
            # this step's update, channel by channel (same ops as _integrate, mode 0)
            a0 = (a0 + np.float32(r.cur[0])) - lam
            a1 = (a1 + np.float32(r.cur[1])) - lam
            a2 = (a2 + np.float32(r.cur[2])) - lam
            a3 = (a3 + np.float32(r.cur[3])) - lam
            r.cur[0] = 0.0
            r.cur[1] = 0.0
            r.cur[2] = 0.0
            r.cur[3] = 0.0
            a0 = a0 if a0 > zero else zero
            a1 = a1 if a1 > zero else zero
            a2 = a2 if a2 > zero else zero
            a3 = a3 if a3 > zero else zero
            f0 = a0 >= theta[0]
            f1 = a1 >= theta[1]
            f2 = a2 >= theta[2]
            f3 = a3 >= theta[3]
            r.v[0] = zero if f0 else a0
            r.v[1] = zero if f1 else a1
            r.v[2] = zero if f2 else a2
            r.v[3] = zero if f3 else a3
            if f0 or f1 or f2 or f3:
                if f0:
                    spikes[ns] = o * 4
                    ns += 1
                if f1:
                    spikes[ns] = o * 4 + 1
                    ns += 1
                if f2:
                    spikes[ns] = o * 4 + 2
                    ns += 1
                if f3:
                    spikes[ns] = o * 4 + 3
                    ns += 1
            continue
        for co in range(4):
            v32 = _replay(r.v[co], k, mode, lam, beta, exact_below)
            i32 = np.float32(r.cur[co])
            r.cur[co] = 0.0
            v32 = _integrate(v32, i32, mode, lam, beta)
            e = o * 4 + co
            if v32 >= theta[co] and not (fire_once and fired[e] != 0):
                spikes[ns] = e
                ns += 1
                v32 = zero
                if fire_once:
                    fired[e] = 1
            r.v[co] = v32
    return ns


@njit(cache=True, nogil=True)
def _pool(
    spikes: np.ndarray, ns: int, c_n: int, w: int, hp: int, wp: int, t: int,
    pbits: np.ndarray, poff: np.ndarray, head: np.ndarray, hmark: np.ndarray,
    nxt: np.ndarray, out_pos: np.ndarray, out_ch: np.ndarray, out_val: np.ndarray, out_off: np.ndarray,
    qlist: np.ndarray, pbeg: np.ndarray,
) -> int:
    """2x2/2 max pooling of binary spikes (floor mode) with torch's first-max-wins index.

    Output entries (pooled flat position, channel, value 1, window offset 0..3 of the first
    spike in row-major order), grouped by pooled position (positions in order of first hit,
    the entries of one position in channel order); ``head``/``nxt`` link the entries of each
    pooled position; they are also contiguous: ``pbeg[pq] .. head[pq]`` (inclusive) are the
    entries of pooled position ``pq``.  Grouped, not sorted: the consumers need adjacency only
    (sums are exact in any order), and the ``np.sort`` of ~2,400 Conv2 entries cost ~0.1 ms
    per step.

    A pooled position's channels are one bit mask (``pbits[pq]``, valid where ``hmark[pq] ==
    t``; ``c_n`` <= 64) and its window offsets int8 (``poff``): ~50 bytes per position, where
    a mark and an offset per (position, channel) in int64 were 576 (3.2 MB at 346x260 for
    Conv2's 36 channels, missed all over per spike).
    """
    npos = 0
    one = np.uint64(1)
    # the layers emit the spikes of one position together: the position's pooled cell, window
    # offset and mark test (a division and unpredictable branches) only when it changes; per
    # spike, a bit and a branch-free min
    lo = 0
    hi = 0
    pq = -1
    off = 0
    for j in range(ns):
        e = spikes[_U(j)]
        if e < lo or e >= hi:
            p = e // c_n
            lo = p * c_n
            hi = lo + c_n
            y = p // w
            x = p - y * w
            py = y >> 1
            px = x >> 1
            pq = -1
            if py < hp and px < wp:
                pq = py * wp + px
                off = (y & 1) * 2 + (x & 1)
                if hmark[_U(pq)] != t:
                    hmark[_U(pq)] = t
                    pbits[_U(pq)] = 0
                    qlist[_U(npos)] = pq
                    npos += 1
        if pq < 0:
            continue
        c = e - lo
        q = pq * c_n + c
        bit = one << np.uint64(c)
        had = pbits[_U(pq)] & bit
        pbits[_U(pq)] |= bit
        old = poff[_U(q)]
        poff[_U(q)] = min(old, off) if had else off
    # second pass: emit the entries position by position, in channel order, linked by output index
    k = 0
    for i in range(npos):
        pq = qlist[_U(i)]
        bits = pbits[_U(pq)]
        pbeg[_U(pq)] = k
        qb = pq * c_n
        while bits:  # the set bits, lowest first (de Bruijn index of the lowest bit)
            low = bits & (~bits + one)
            bits ^= low
            c = _DEBRUIJN[_U((low * _DEBRUIJN_MUL) >> np.uint64(58))]
            out_pos[_U(k)] = pq
            out_ch[_U(k)] = c
            out_val[_U(k)] = np.float32(1.0)
            out_off[_U(k)] = poff[_U(qb + c)]
            nxt[_U(k)] = k - 1 if k > pbeg[_U(pq)] else -1
            k += 1
        head[_U(pq)] = k - 1
    return k


@njit(cache=True, nogil=True)
def _encode_layers(
    a_pos: np.ndarray, a_ch: np.ndarray, a_val: np.ndarray, n_in: int, t: int, fo: bool,
    h: int, w: int, h2: int, w2: int, h4: int, w4: int,
    e1: np.ndarray, rec1: np.ndarray, fired1: np.ndarray, touched1: np.ndarray, spk1: np.ndarray,
    th1: np.ndarray, mode1: int, lam1: np.float32, beta1: np.float32, ex1: np.float32,
    pbits1: np.ndarray, poff1: np.ndarray, qlist1: np.ndarray,
    head1: np.ndarray, hmark1: np.ndarray, next1: np.ndarray, ppos1: np.ndarray, pch1: np.ndarray,
    pval1: np.ndarray, poffo1: np.ndarray, pbeg1: np.ndarray,
    e2: np.ndarray, cur2: np.ndarray, v2: np.ndarray, last2: np.ndarray, fired2: np.ndarray, mark2: np.ndarray,
    touched2: np.ndarray, spk2: np.ndarray, th2: np.ndarray, mode2: int, lam2: np.float32, beta2: np.float32,
    ex2: np.float32,
    pbits2: np.ndarray, poff2: np.ndarray, qlist2: np.ndarray,
    head2: np.ndarray, hmark2: np.ndarray, next2: np.ndarray, ppos2: np.ndarray, pch2: np.ndarray,
    pval2: np.ndarray, poffo2: np.ndarray, pbeg2: np.ndarray,
    e3: np.ndarray, cur3: np.ndarray, v3: np.ndarray, last3: np.ndarray, fired3: np.ndarray, mark3: np.ndarray,
    touched3: np.ndarray, spk3: np.ndarray, th3: np.ndarray, ex3: np.float32,
) -> tuple[int, int, int, int, int]:
    """Conv1 -> Pool1 -> Conv2 -> Pool2 -> Conv3 of one step in one compiled call; returns
    (n1, np1, n2, np2, n3).  The same calls :meth:`SparseSpikeSEG.step` made one by one from
    Python: one dispatch and one GIL release per step instead of five (with the node's HULK
    stage on a helper thread, every return from a kernel waited for the GIL).  ``spk3[:n3]``
    is sorted on return (raster order)."""
    n1 = _layer_c1(a_pos, a_ch, a_val, n_in, w, e1, h, w, rec1, fired1, touched1, t,
                   th1, mode1, lam1, beta1, ex1, fo, spk1)
    np1 = _pool(spk1, n1, 4, w, h2, w2, t, pbits1, poff1,
                head1, hmark1, next1, ppos1, pch1, pval1, poffo1, qlist1, pbeg1)
    n2 = _layer(ppos1, pch1, pval1, np1, w2, e2, 2, h2, w2, cur2, v2, last2, fired2, mark2, touched2, t,
                th2, mode2, lam2, beta2, ex2, fo, spk2)
    np2 = _pool(spk2, n2, 36, w2, h4, w4, t, pbits2, poff2,
                head2, hmark2, next2, ppos2, pch2, pval2, poffo2, qlist2, pbeg2)
    if e3.shape[3] == 1:  # one class: raster order already
        n3 = _layer_one(ppos2, pch2, pval2, np2, w4, e3, 3, h4, w4, cur3, v3, last3, fired3, t,
                        th3, 2, np.float32(0.0), np.float32(1.0), ex3, fo, spk3)
    else:
        n3 = _layer(ppos2, pch2, pval2, np2, w4, e3, 3, h4, w4, cur3, v3, last3, fired3, mark3, touched3, t,
                    th3, 2, np.float32(0.0), np.float32(1.0), ex3, fo, spk3)
        spk3[:n3].sort()
    return n1, np1, n2, np2, n3


@njit(cache=True, nogil=True)
def _scatter5(
    val: float, wt: np.ndarray, ci: int, ty: int, tx: int, h: int, w: int, stamp: int,
    acc: np.ndarray, mark: np.ndarray, lst: np.ndarray, n: int,
) -> int:
    """Transposed-conv scatter of one unpooled value: ``acc[ty+ky-2, tx+kx-2, :] += val * wt[ci, ky, kx, :]``."""
    c_n = wt.shape[3]
    for ky in range(5):
        oy = ty + ky - 2
        if oy < 0 or oy >= h:
            continue
        for kx in range(5):
            ox = tx + kx - 2
            if ox < 0 or ox >= w:
                continue
            o = oy * w + ox
            if mark[_U(o)] != stamp:
                mark[_U(o)] = stamp
                lst[n] = o
                n += 1
            base = o * c_n
            for c in range(c_n):
                acc[_U(base + c)] += val * wt[_U(ci), _U(ky), _U(kx), _U(c)]
    return n


@njit(cache=True, nogil=True)
def _decode(
    spk_pos: np.ndarray, n_spk: int, k: int, w3t: np.ndarray, w2t: np.ndarray, k1t: np.ndarray,
    w4: int, h2: int, w2: int, h: int, w: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_next: np.ndarray, p2_pos: np.ndarray, p2_ch: np.ndarray,
    p2_off: np.ndarray, n_p2: int,
    p1_head: np.ndarray, p1_hmark: np.ndarray, p1_next: np.ndarray, p1_ch: np.ndarray, p1_off: np.ndarray,
    t: int, gate: bool, stamp: int,
    d3: np.ndarray, d3mark: np.ndarray, d3list: np.ndarray,
    d2: np.ndarray, d2mark: np.ndarray, d2list: np.ndarray, d2pos: np.ndarray,
    sal: np.ndarray, salmark: np.ndarray, sallist: np.ndarray,
) -> tuple[int, int]:
    """Saliency of class ``k`` from the given S3 spikes (flat positions on the H/4 grid).

    D3 = convT(S3_k, W3, pad 3) -> unpool(idx2) [gate: x S2, i.e. spiking windows only, at
    their first spike] -> D2 = convT(., W2, pad 2) -> unpool(idx1) [gate: x S1] ->
    saliency = convT(., K1 = sum_cin W1, pad 2).  Leaves the saliency in ``sal`` at the
    ``sallist`` positions (the caller reads and zeroes it) and the Conv2-grid positions with
    positive D2 in ``d2pos`` (ASH support).  Returns (n_d2pos, n_sal).  ``stamp`` must be
    unique per call.

    D3 is computed by scatter (49 x 36 adds per spike) or, gated and with many spikes, by
    gather at the P2 entries only (49 lookups each): same sums in another order (float64).
    """
    c2 = w3t.shape[3]
    c1 = w2t.shape[3]
    h4 = d3mark.shape[0] // w4
    n2 = 0
    if gate and n_spk * c2 > n_p2:
        for s in range(n_spk):
            d3mark[spk_pos[s]] = stamp
        for e in range(n_p2):
            q = p2_pos[e]
            ci = p2_ch[e]
            qy = q // w4
            qx = q - qy * w4
            val = 0.0
            hit = False
            for ky in range(7):
                sy = qy - ky + 3
                if sy < 0 or sy >= h4:
                    continue
                for kx in range(7):
                    sx = qx - kx + 3
                    if sx < 0 or sx >= w4:
                        continue
                    if d3mark[sy * w4 + sx] == stamp:
                        val += w3t[k, ky, kx, ci]
                        hit = True
            if hit:
                off = p2_off[e]
                n2 = _scatter5(val, w2t, ci, 2 * qy + (off >> 1), 2 * qx + (off & 1), h2, w2, stamp,
                               d2, d2mark, d2list, n2)
    else:
        n3 = 0
        for s in range(n_spk):
            p = spk_pos[s]
            y = p // w4
            x = p - y * w4
            for ky in range(7):
                oy = y + ky - 3
                if oy < 0 or oy >= h4:
                    continue
                for kx in range(7):
                    ox = x + kx - 3
                    if ox < 0 or ox >= w4:
                        continue
                    o = oy * w4 + ox
                    if d3mark[o] != stamp:
                        d3mark[o] = stamp
                        d3list[n3] = o
                        n3 += 1
                    base = o * c2
                    for ci in range(c2):
                        d3[base + ci] += w3t[k, ky, kx, ci]
        offs = np.zeros(c2, dtype=np.int64)
        for j in range(n3):
            q = d3list[j]
            qy = q // w4
            qx = q - qy * w4
            has = p2_hmark[q] == t
            if gate:
                if not has:
                    continue
                e = p2_head[q]
                while e >= 0:
                    ci = p2_ch[e]
                    off = p2_off[e]
                    n2 = _scatter5(d3[q * c2 + ci], w2t, ci, 2 * qy + (off >> 1), 2 * qx + (off & 1), h2, w2,
                                   stamp, d2, d2mark, d2list, n2)
                    e = p2_next[e]
            else:
                offs[:] = 0
                if has:
                    e = p2_head[q]
                    while e >= 0:
                        offs[p2_ch[e]] = p2_off[e]
                        e = p2_next[e]
                for ci in range(c2):
                    off = offs[ci]
                    n2 = _scatter5(d3[q * c2 + ci], w2t, ci, 2 * qy + (off >> 1), 2 * qx + (off & 1), h2, w2,
                                   stamp, d2, d2mark, d2list, n2)
        for j in range(n3):
            base = d3list[j] * c2
            for ci in range(c2):
                d3[base + ci] = 0.0
    # unpool 1 + saliency scatter through K1 = sum_cin W1 (k1t is (4, 5, 5, 1))
    ns = 0
    nd = 0
    offs1 = np.zeros(c1, dtype=np.int64)
    for j in range(n2):
        q = d2list[j]
        qy = q // w2
        qx = q - qy * w2
        pos_any = False
        for c in range(c1):
            if d2[q * c1 + c] > 0:
                pos_any = True
        if pos_any:
            d2pos[nd] = q
            nd += 1
        has = p1_hmark[q] == t
        if gate:
            if not has:
                continue
            e = p1_head[q]
            while e >= 0:
                c = p1_ch[e]
                off = p1_off[e]
                ns = _scatter5(d2[q * c1 + c], k1t, c, 2 * qy + (off >> 1), 2 * qx + (off & 1), h, w, stamp,
                               sal, salmark, sallist, ns)
                e = p1_next[e]
        else:
            offs1[:] = 0
            if has:
                e = p1_head[q]
                while e >= 0:
                    offs1[p1_ch[e]] = p1_off[e]
                    e = p1_next[e]
            for c in range(c1):
                off = offs1[c]
                ns = _scatter5(d2[q * c1 + c], k1t, c, 2 * qy + (off >> 1), 2 * qx + (off & 1), h, w, stamp,
                               sal, salmark, sallist, ns)
    for j in range(n2):
        base = d2list[j] * c1
        for c in range(c1):
            d2[base + c] = 0.0
    return nd, ns


@njit(cache=True, nogil=True)
def _mask_into(
    mask: np.ndarray, best: np.ndarray, bestmark: np.ndarray, stamp0: int, cls: int,
    sal: np.ndarray, sallist: np.ndarray, ns: int, cut: float, lit: np.ndarray, n_lit: int,
) -> int:
    """``mask = cls + 1`` where ``sal > cut`` and it beats earlier classes (first max wins); zero ``sal``.

    Pixels lit for the first time this step (``bestmark != stamp0``) are appended to ``lit``;
    returns the new count (so the window needs no scan of the whole mask).
    """
    for j in range(ns):
        o = sallist[j]
        v = sal[o]
        sal[o] = 0.0
        if v > cut:
            if bestmark[o] != stamp0:
                bestmark[o] = stamp0
                best[o] = v
                mask[o] = cls + 1
                lit[n_lit] = o
                n_lit += 1
            elif v > best[o]:
                best[o] = v
                mask[o] = cls + 1
    return n_lit


@njit(cache=True, nogil=True, inline="always")
def _gather_cell(
    beg: int, end: int, p2_off: np.ndarray, p2_ch: np.ndarray, v3s: np.ndarray, vb: int,
    w2f: np.ndarray, by: int, bx: int,
) -> tuple[int, int, int, int]:
    """``sum_e v3s[vb + ci_e] * W2[ci_e, by - offy_e, bx - offx_e, c]`` for c = 0..3 over the P2
    entries ``beg:end`` of one pool2 cell (contiguous), in the two gated decoders, in integer
    units (``v3s``: W3 or D3 rows, ``w2f``: W2, both in units of 2^-12).

    ``w2f``: W2 zero-padded to (36, 7, 7, 4), so ``ky, kx = by - offy + 1, bx - offx + 1`` lie in
    0..6 and entries out of reach add exact zeros: the loop has no branch.
    """
    d0 = 0
    d1 = 0
    d2 = 0
    d3 = 0
    for e in range(beg, end):
        off = p2_off[_U(e)]
        ci = p2_ch[_U(e)]
        v3 = np.int64(v3s[_U(vb + ci)])
        i2 = ((ci * 7 + by + 1 - (off >> 1)) * 7 + bx + 1 - (off & 1)) * 4
        d0 += v3 * np.int64(w2f[_U(i2)])
        d1 += v3 * np.int64(w2f[_U(i2 + 1)])
        d2 += v3 * np.int64(w2f[_U(i2 + 2)])
        d3 += v3 * np.int64(w2f[_U(i2 + 3)])
    return d0, d1, d2, d3


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _mask_gated(
    spk_pos: np.ndarray, n_spk: int, k: int, w3rows: np.ndarray, w2p: np.ndarray, k1t: np.ndarray,
    w4: int, h4: int, w2: int, h: int, w: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_beg: np.ndarray, p2_ch: np.ndarray, p2_off: np.ndarray,
    p1_pos: np.ndarray, n_p1: int,
    p1_head: np.ndarray, p1_next: np.ndarray, p1_ch: np.ndarray, p1_off: np.ndarray,
    t: int, stamp: int, s3bits: np.ndarray, d3q: np.ndarray, d3h: np.ndarray, d3l: np.ndarray, d3big: np.ndarray,
    d3mark: np.ndarray,
    sal: np.ndarray, salmark: np.ndarray, sallist: np.ndarray,
    mask: np.ndarray, best: np.ndarray, bestmark: np.ndarray, stamp0: int, cut: float, lit: np.ndarray, n_lit: int,
    bblk: np.ndarray, bslot: np.ndarray, bmark: np.ndarray, nbs: np.ndarray, every: int,
) -> int:
    """Gated joint saliency of class ``k`` from its S3 spikes, by gather at the P1 cells only,
    written into the mask by :func:`_mask_into` (in this call: one dispatch and one GIL release
    per class); returns the new ``lit`` count.

    The gate keeps D2 only at pooled Conv1 cells that spiked (P1 entries), so instead of
    scattering D3 -> D2 over every P2 entry in reach (:func:`_decode`, ~100 adds each),
    D2 is gathered at each P1 position ``a``: ``D2[a, c] = sum_e D3[e] W2[ci_e, a - r_e + 2, c]``
    over the P2 entries ``e`` (pool2 cell ``q``, channel ``ci``, unpool target ``r``) with
    ``r`` within 2 of ``a``; ``D3[e] = sum_s W3[k, q - s + 3, ci]`` over the S3 spikes ``s`` in
    the 7x7 window of ``q`` is gathered once per pool2 cell for all 36 channels (cached by
    ``d3mark``; scattering it from the spikes instead measured ~20 % slower, one gather per
    entry ~10 % slower): one contiguous, vectorised add per window row, of the row's spike
    pattern (7 bits of the S3 row bitmasks) looked up in ``w3rows`` (:func:`w3_row_table`);
    a first version added W3 once per spike, bit by bit (~1,500 cycles per cell at the
    scene's S3 density).  The W2 taps from the pool2 cells to each P1 position come from
    the step's W2 blocks (:func:`_cell_blocks`), which this call lays out in the step's bank
    (``bblk``; P1 position ``a``'s slot is ``bslot[a]`` where ``bmark[a] == t``; ``nbs``:
    slots used, positions left without one when ``bblk`` ran out (gathered entry by entry
    instead; the caller grows ``bblk``)): the per-spike supports (:func:`_support_one`,
    on the overlap helper) read them instead of building their own, and D2 here is four
    length-48 integer dot products per pool2 cell (:func:`_dot4`; D3 reaches 2^18: where it
    does not fit int16, ``d3big[q]``, it is split into int16 halves ``d3h``, ``d3l`` and
    dotted twice).  Then the K1 scatter at the P1 entries,
    as in :func:`_decode`.  Same sums, another order: integers in units of 2^-24 up to D2,
    float64 after, all exact on the 2^-12 weight grid, so the mask is identical.
    """
    w2f = w2p.reshape(-1)  # (36, 7, 7, 4) int16: W2 with a zero border; four Conv1 features (the architecture)
    w3r = w3rows.reshape(-1)  # (k, 7, 128, 48) int16: W3 summed over each row pattern
    # S3 as row bitmasks (``s3bits``: (H/4, words) uint64, zero on entry and on return; column
    # sx at bit sx + 3): an entry's 7 x 7 window is 7 word extractions and its set bits, not
    # 49 mark tests (S3 is ~10 % dense on the scene).  uint64 throughout: numba turns mixed
    # int64/uint64 comparisons into float conversions (a first version was 8x slower).
    one = np.uint64(1)
    zero64 = np.uint64(0)
    for s in range(n_spk):
        sy = spk_pos[s] // w4
        b = spk_pos[s] - sy * w4 + 3
        s3bits[sy, b >> 6] |= one << np.uint64(b & 63)
    ns = 0
    n_pos = 0
    j = 0
    while j < n_p1:
        a = p1_pos[j]
        while j < n_p1 and p1_pos[j] == a:
            j += 1
        ay = a // w2
        ax = a - ay * w2
        slot = -1
        n_pos += 1
        if bmark[_U(a)] == t:  # built by an earlier class's pass
            slot = bslot[_U(a)]
        elif every > 0 and n_pos % every == 0:  # else left to the supports: the two threads' shares
            slot = _block_slot(a, ay, ax, t, bmark, bslot, nbs, bblk, w4, h4, p2_head, p2_hmark, p2_beg, p2_ch,
                               p2_off, t, w2f)
        qy0 = (ay - 2) >> 1
        qx0 = (ax - 2) >> 1
        d0 = 0
        d1 = 0
        d2 = 0
        d3s = 0
        for qy in range(max(0, (ay - 2) >> 1), min(h4, ((ay + 2) >> 1) + 1)):
            for qx in range(max(0, (ax - 2) >> 1), min(w4, ((ax + 2) >> 1) + 1)):
                q = qy * w4 + qx
                if p2_hmark[_U(q)] != t:
                    continue
                qb = q * _CP
                if d3mark[_U(q)] != stamp:  # D3 of all 36 channels of q, gathered once per call
                    d3mark[_U(q)] = stamp
                    for ci in range(_CP):
                        d3q[_U(qb + ci)] = 0
                    wd = qx >> 6
                    sh = np.uint64(qx & 63)
                    for sy in range(max(0, qy - 3), min(h4, qy + 4)):
                        bits = s3bits[_U(sy), _U(wd)] >> sh
                        if sh != zero64:
                            bits |= s3bits[_U(sy), _U(wd + 1)] << (np.uint64(64) - sh)
                        bits &= np.uint64(127)  # bit j is column qx - 3 + j
                        if bits == zero64:
                            continue
                        wb = ((k * 7 + qy - sy + 3) * 128 + np.int64(bits)) * _CP
                        for ci in range(_CP):  # contiguous: vectorised
                            d3q[_U(qb + ci)] += w3r[_U(wb + ci)]
                    top = 0
                    for ci in range(_CP):
                        top = max(top, d3q[_U(qb + ci)])
                    if top < 32768:  # fits int16 (usual: < 8 spikes' worth): one dot product
                        d3big[_U(q)] = False
                        for ci in range(_CP):
                            d3l[_U(qb + ci)] = d3q[_U(qb + ci)]
                    else:
                        d3big[_U(q)] = True
                        for ci in range(_CP):
                            v = d3q[_U(qb + ci)]
                            d3h[_U(qb + ci)] = v >> _D3_SHIFT
                            d3l[_U(qb + ci)] = v & _D3_LOW
                if slot >= 0:
                    bb = (slot * 9 + (qy - qy0) * 3 + qx - qx0) * _QB
                    l0, l1, l2, l3 = _dot4(d3l, qb, bblk, bb)
                    if d3big[_U(q)]:
                        h0, h1, h2, h3 = _dot4(d3h, qb, bblk, bb)
                        l0 += h0 << _D3_SHIFT
                        l1 += h1 << _D3_SHIFT
                        l2 += h2 << _D3_SHIFT
                        l3 += h3 << _D3_SHIFT
                    d0 += l0
                    d1 += l1
                    d2 += l2
                    d3s += l3
                    continue
                by = ay - 2 * qy + 2
                bx = ax - 2 * qx + 2
                s0, s1, s2, s3 = _gather_cell(p2_beg[_U(q)], p2_head[_U(q)] + 1, p2_off, p2_ch, d3q, qb, w2f, by, bx)
                d0 += s0
                d1 += s1
                d2 += s2
                d3s += s3
        if d0 == 0 and d1 == 0 and d2 == 0 and d3s == 0:
            continue  # nothing reaches a (a zero scatter would light no pixel: cut >= 0)
        f0 = np.float64(d0) * _UNIT  # exact: D2 < 2^14 on the 2^-24 grid
        f1 = np.float64(d1) * _UNIT
        f2 = np.float64(d2) * _UNIT
        f3 = np.float64(d3s) * _UNIT
        e = p1_head[a]
        while e >= 0:
            c = p1_ch[e]
            off = p1_off[e]
            dc = f0 if c == 0 else (f1 if c == 1 else (f2 if c == 2 else f3))
            ns = _scatter5(dc, k1t, c, 2 * ay + (off >> 1), 2 * ax + (off & 1), h, w, stamp,
                           sal, salmark, sallist, ns)
            e = p1_next[e]
    for s in range(n_spk):
        sy = spk_pos[s] // w4
        b = spk_pos[s] - sy * w4 + 3
        s3bits[sy, b >> 6] = zero64
    return _mask_into(mask, best, bestmark, stamp0, k, sal, sallist, ns, cut, lit, n_lit)


@njit(cache=True, nogil=True, inline="always")
def _block_slot(
    a: int, ay: int, ax: int, mark: int, marks: np.ndarray, slots: np.ndarray, counts: np.ndarray, blk: np.ndarray,
    w4: int, h4: int, p2_head: np.ndarray, p2_hmark: np.ndarray, p2_beg: np.ndarray, p2_ch: np.ndarray,
    p2_off: np.ndarray, t: int, w2f: np.ndarray,
) -> int:
    """A new slot of ``blk`` for pooled Conv1 cell ``a`` at ``(ay, ax)``, its W2 blocks built
    (:func:`_cell_blocks`; ``marks[a] = mark``, ``slots[a]`` = the slot, ``counts[0]`` slots
    used), or -1 when ``blk`` is full (``counts[1]`` counts those cells)."""
    if counts[0] >= blk.shape[0] // BLOCK_SLOT:
        counts[1] += 1
        return -1
    slot = counts[0]
    counts[0] = slot + 1
    marks[_U(a)] = mark
    slots[_U(a)] = slot
    _cell_blocks(ay, ax, slot * 9, blk, w4, h4, p2_head, p2_hmark, p2_beg, p2_ch, p2_off, t, w2f)
    return slot


@njit(cache=True, nogil=True)
def _cell_blocks(
    ay: int, ax: int, base: int, blk: np.ndarray, w4: int, h4: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_beg: np.ndarray, p2_ch: np.ndarray, p2_off: np.ndarray,
    t: int, w2f: np.ndarray,
) -> None:
    """The W2 taps from the active pool2 cells near pooled Conv1 cell ``(ay, ax)`` to it, as nine
    dense blocks ``blk[base + j]`` of (4, 48) int16 (:data:`_QB`; j = 3 (qy - qy0) + qx - qx0 over
    the 3 x 3 pool2 cells whose unpool targets can lie within 2 of it; ``w2f``: the int16 W2
    table; channels without a P2 entry at q, and the padding, are 0; blocks of inactive cells
    are left unwritten and never read)."""
    qy0 = (ay - 2) >> 1
    qx0 = (ax - 2) >> 1
    for jy in range(3):
        qy = qy0 + jy
        if qy < 0 or qy >= h4:
            continue
        for jx in range(3):
            qx = qx0 + jx
            if qx < 0 or qx >= w4:
                continue
            q = qy * w4 + qx
            if p2_hmark[_U(q)] != t:
                continue
            bb = (base + jy * 3 + jx) * _QB
            for i in range(_QB):
                blk[_U(bb + i)] = 0
            by = ay - 2 * qy + 2
            bx = ax - 2 * qx + 2
            for e in range(p2_beg[_U(q)], p2_head[_U(q)] + 1):
                off = p2_off[_U(e)]
                ci = p2_ch[_U(e)]
                i2 = ((ci * 7 + by + 1 - (off >> 1)) * 7 + bx + 1 - (off & 1)) * 4
                blk[_U(bb + ci)] = w2f[_U(i2)]
                blk[_U(bb + _CP + ci)] = w2f[_U(i2 + 1)]
                blk[_U(bb + 2 * _CP + ci)] = w2f[_U(i2 + 2)]
                blk[_U(bb + 3 * _CP + ci)] = w2f[_U(i2 + 3)]


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _support_one(
    p: int, k: int, w3t: np.ndarray, w2p: np.ndarray, k1t: np.ndarray,
    w4: int, h2: int, w2: int, h: int, w: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_beg: np.ndarray, p2_ch: np.ndarray, p2_off: np.ndarray,
    p1_head: np.ndarray, p1_next: np.ndarray, p1_ch: np.ndarray, p1_off: np.ndarray,
    t: int, cut: float, loc: np.ndarray, span: np.ndarray, pixels: np.ndarray, total: int, box: np.ndarray,
    blk: np.ndarray, slot_of: np.ndarray, slot_mark: np.ndarray, mark: int, nsl: np.ndarray,
    row_beg: np.ndarray, row_x: np.ndarray, bblk: np.ndarray, bslot: np.ndarray, bmark: np.ndarray, shared: bool,
) -> int:
    """Gated support of ONE S3 spike (flat position ``p`` on the H/4 grid, class ``k``), by gather.

    :func:`_decode` scatters forward from the spike (D3 -> every P2 entry in reach -> 25 x 4
    D2 adds each), although the gate then keeps D2 only at the few pooled Conv1 cells that
    spiked.  Here D2 is gathered at exactly those cells: for each P1 entry in the spike's
    18 x 18 pool1-cell crop, ``D2[a, c] = sum W3[k, ci, q - p + 3] * W2[ci, c, a - r + 2]`` over
    the P2 entries ``(q, ci)`` of the spike's 7 x 7 window whose unpool target ``r`` lies
    within 2 of ``a`` (D3 of a one-hot S3 is the kernel itself: one term), then it is
    scattered through K1 like :func:`_decode`.  Work ~ (P1 entries in reach) x (P2 entries
    near each), instead of (P2 entries in reach) x 100.  Same sums, another order: integers in
    units of 2^-24 up to D2 (``w3t``: W3 as int16 (k, 7, 7, 48), ``w2p``: the int16 W2 table of
    :func:`_gather_cell`), float64 after, exact on the 2^-12 weight grid, so the supports are
    identical.

    The W2 taps come from per-cell blocks (:func:`_cell_blocks`): a step's selected spikes
    cluster on the objects, so each (pool2 cell, pooled Conv1 cell) pair is gathered for ~30
    of them, and re-deriving the tap of every P2 entry each time (:func:`_gather_cell`: index
    arithmetic and four dependent adds per entry) cost more than laying the taps of a pooled
    Conv1 cell out once per call as dense (4, 48) int16 blocks (slot ``slot_of[a]``, valid where
    ``slot_mark[a] == mark``); a visit is then four length-48 integer dot products with W3's
    contiguous channel row (:func:`_dot4`: 12 vector multiply-adds).  Missing channels are
    exact zeros, so the sums are the same.  The joint mask
    (:func:`_mask_gated`) has usually laid the step's blocks out already, in the step's bank
    (``bblk``, slot ``bslot[a]`` where ``bmark[a] == t``; ``shared``: that pass is complete):
    those are read, and only cells
    without one are built here.  When the ``blk`` slots run out a cell is gathered entry by
    entry (``nsl[1]`` counts those cells; the caller grows ``blk``).

    The pooled Conv1 cells that spiked come row by row from ``row_beg`` / ``row_x``
    (:func:`_active_rows`): ~10 of the crop's 324 cells are active, so testing each cell's
    mark cost more than the cells' work.

    The K1 scatter goes into ``loc``, a dense 40 x 40 crop of the pixels the spike can reach
    (rows 4 sy - 18 .. 4 sy + 21; all zeros on entry and on return), without bounds tests or
    touched-pixel marks, and the support (saliency > ``cut``, inside the sensor) is collected
    by one scan of each crop row's written span (``span``: (40, 2), all rows empty (40, -1)
    on entry and on return): the marked scatter and its touched-list walk were ~60 % of a
    spike's decode, and a scan of the whole touched rectangle ~20 % (the P1 entries are
    spread, so most of the rectangle was never written).  Appends the support to ``pixels`` from ``total`` (raster order
    within the crop) and writes its inclusive bbox to ``box`` (-1s when empty); returns the
    new total.
    """
    h4 = p2_hmark.shape[0] // w4
    sy = p // w4
    sx = p - sy * w4
    w3f = w3t.reshape(-1)
    w2f = w2p.reshape(-1)
    k1f = k1t.reshape(-1)
    oy = 4 * sy - 18
    ox = 4 * sx - 18
    rlo = 40
    rhi = -1
    ax_lo = max(0, 2 * sx - 8)
    ax_hi = min(w2, 2 * sx + 10)
    for ay in range(max(0, 2 * sy - 8), min(h2, 2 * sy + 10)):
        for j in range(row_beg[ay], row_beg[ay + 1]):  # the active pooled Conv1 cells of row ay
            ax = row_x[_U(j)]
            if ax < ax_lo or ax >= ax_hi:
                continue
            a = ay * w2 + ax
            src = blk
            if shared and bmark[_U(a)] == t:  # laid out by the joint mask
                slot = bslot[_U(a)]
                src = bblk
            elif slot_mark[_U(a)] == mark:
                slot = slot_of[_U(a)]
            else:
                slot = _block_slot(a, ay, ax, mark, slot_mark, slot_of, nsl, blk, w4, h4, p2_head, p2_hmark, p2_beg,
                                   p2_ch, p2_off, t, w2f)
            # four Conv1 features (fixed by the architecture), integer sums in units of 2^-24
            d0 = 0
            d1 = 0
            d2 = 0
            d3 = 0
            # pool2 cells whose unpool targets r can lie within 2 of (ay, ax), inside the spike's window
            qy0 = (ay - 2) >> 1
            qx0 = (ax - 2) >> 1
            for qy in range(max(max(0, qy0), sy - 3), min(min(h4, qy0 + 3), sy + 4)):
                for qx in range(max(max(0, qx0), sx - 3), min(min(w4, qx0 + 3), sx + 4)):
                    q = qy * w4 + qx
                    if p2_hmark[_U(q)] != t:
                        continue
                    b3 = ((k * 7 + qy - sy + 3) * 7 + qx - sx + 3) * _CP
                    if slot >= 0:
                        s0, s1, s2, s3 = _dot4(w3f, b3, src, (slot * 9 + (qy - qy0) * 3 + qx - qx0) * _QB)
                    else:
                        by = ay - 2 * qy + 2
                        bx = ax - 2 * qx + 2
                        s0, s1, s2, s3 = _gather_cell(p2_beg[_U(q)], p2_head[_U(q)] + 1, p2_off, p2_ch, w3f, b3, w2f, by, bx)
                    d0 += s0
                    d1 += s1
                    d2 += s2
                    d3 += s3
            f0 = np.float64(d0) * _UNIT  # exact: D2 < 2^14 on the 2^-24 grid
            f1 = np.float64(d1) * _UNIT
            f2 = np.float64(d2) * _UNIT
            f3 = np.float64(d3) * _UNIT
            e = p1_head[a]
            while e >= 0:
                c = p1_ch[e]
                off = p1_off[e]
                dc = f0 if c == 0 else (f1 if c == 1 else (f2 if c == 2 else f3))
                ry = 2 * ay + (off >> 1) - oy  # unpool target in the crop: 2 .. 37
                rx = 2 * ax + (off & 1) - ox
                rlo = min(rlo, ry)
                rhi = max(rhi, ry)
                kb = c * 25
                for ky in range(5):
                    ly = _U(ry + ky - 2)
                    span[ly, 0] = min(span[ly, 0], rx - 2)
                    span[ly, 1] = max(span[ly, 1], rx + 2)
                    for kx in range(5):
                        loc[ly, _U(rx + kx - 2)] += dc * k1f[_U(kb + ky * 5 + kx)]
                e = p1_next[e]
    x0, y0, x1, y1 = w, h, -1, -1
    if rhi >= 0:
        for ly in range(rlo - 2, rhi + 3):  # each row's written span only
            c_lo = span[_U(ly), 0]
            c_hi = span[_U(ly), 1]
            if c_hi < c_lo:
                continue
            if -oy <= ly <= h - 1 - oy:
                py = ly + oy
                base = py * w + ox
                t0 = total
                # branch-free: every candidate is written, the count advances on the kept ones
                # (the buffer has room for a spike's whole crop): supports 0.93x
                for lx in range(max(c_lo, -ox), min(c_hi, w - 1 - ox) + 1):
                    pixels[_U(total)] = base + lx
                    total += np.int64(loc[_U(ly), _U(lx)] > cut)
                if total > t0:  # kept pixels run left to right: the row's first and last
                    y0 = min(y0, py)
                    y1 = max(y1, py)
                    x0 = min(x0, pixels[_U(t0)] - py * w)
                    x1 = max(x1, pixels[_U(total - 1)] - py * w)
            for lx in range(c_lo, c_hi + 1):
                loc[_U(ly), _U(lx)] = 0.0
            span[_U(ly), 0] = 40
            span[_U(ly), 1] = -1
    if x1 < 0:
        x0, y0 = -1, -1
    box[0] = x0
    box[1] = y0
    box[2] = x1
    box[3] = y1
    return total


@njit(cache=True, nogil=True)
def _active_rows(p1_pos: np.ndarray, n_p1: int, w2: int, h2: int, row_beg: np.ndarray, row_x: np.ndarray) -> None:
    """The distinct positions of a step's P1 entries (``p1_pos[:n_p1]``, grouped by position) by
    row: row ``ay``'s columns are ``row_x[row_beg[ay]:row_beg[ay + 1]]`` (counting sort)."""
    for ay in range(h2 + 1):
        row_beg[ay] = 0
    prev = -1
    for e in range(n_p1):
        a = p1_pos[e]
        if a != prev:
            row_beg[a // w2 + 1] += 1
            prev = a
    for ay in range(h2):
        row_beg[ay + 1] += row_beg[ay]
    fill = row_beg[:h2].copy()
    prev = -1
    for e in range(n_p1):
        a = p1_pos[e]
        if a != prev:
            ay = a // w2
            row_x[fill[ay]] = a - ay * w2
            fill[ay] += 1
            prev = a


@njit(cache=True, nogil=True)
def _decode_batch(
    spikes: np.ndarray, n_cls: int, cut: float, w3t: np.ndarray, w2t: np.ndarray, k1t: np.ndarray,
    w4: int, h2: int, w2: int, h: int, w: int,
    p2_head: np.ndarray, p2_hmark: np.ndarray, p2_next: np.ndarray, p2_pos: np.ndarray, p2_ch: np.ndarray,
    p2_off: np.ndarray, n_p2: int, p2_beg: np.ndarray,
    p1_head: np.ndarray, p1_hmark: np.ndarray, p1_next: np.ndarray, p1_ch: np.ndarray, p1_off: np.ndarray,
    t: int, gate: bool, stamp0: int,
    d3: np.ndarray, d3mark: np.ndarray, d3list: np.ndarray,
    d2: np.ndarray, d2mark: np.ndarray, d2list: np.ndarray, d2pos: np.ndarray,
    sal: np.ndarray, salmark: np.ndarray, sallist: np.ndarray,
    offsets: np.ndarray, pixels: np.ndarray, bboxes: np.ndarray, loc: np.ndarray, w2p: np.ndarray,
    w3g: np.ndarray, blk: np.ndarray, nsl: np.ndarray, p1_pos: np.ndarray, n_p1: int,
    row_beg: np.ndarray, row_x: np.ndarray, bblk: np.ndarray, bslot: np.ndarray, bmark: np.ndarray, shared: bool,
) -> int:
    """Decode each S3 spike on its own (one-hot S3), all B spikes in one call.

    ``spikes``: flat channels-last S3 indices ``pos * n_cls + k``.  Instance b's support
    (pixels with saliency > ``cut``) is ``pixels[offsets[b]:offsets[b + 1]]`` (flat y*W+x,
    distinct, in no particular order) and ``bboxes[b] = (x0, y0, x1, y1)`` inclusive, (-1, ...) when empty.
    Stamps ``stamp0 + 1 .. stamp0 + B`` are used.  ``loc``: the gated path's 40 x 40 float64
    crop, all zeros.  Returns the total number of pixels.
    """
    one = np.zeros(1, dtype=np.int64)
    total = 0
    span = np.empty((40, 2), np.int64)  # _support_one: each crop row's written columns (empty: 40, -1)
    span[:, 0] = 40
    span[:, 1] = -1
    if gate and spikes.shape[0] > 0:
        _active_rows(p1_pos, n_p1, w2, h2, row_beg, row_x)
    for b in range(spikes.shape[0]):
        e = spikes[b]
        one[0] = e // n_cls
        k = e - one[0] * n_cls
        offsets[b] = total
        if gate:
            total = _support_one(one[0], k, w3g, w2p, k1t, w4, h2, w2, h, w,
                                 p2_head, p2_hmark, p2_beg, p2_ch, p2_off,
                                 p1_head, p1_next, p1_ch, p1_off, t, cut, loc, span, pixels, total, bboxes[b],
                                 # the gated path leaves d2pos / d2mark unused: block slots and marks
                                 blk, d2pos, d2mark, stamp0, nsl, row_beg, row_x, bblk, bslot, bmark, shared)
            continue
        _nd, ns = _decode(one, 1, k, w3t, w2t, k1t, w4, h2, w2, h, w,
                          p2_head, p2_hmark, p2_next, p2_pos, p2_ch, p2_off, n_p2,
                          p1_head, p1_hmark, p1_next, p1_ch, p1_off, t, gate, stamp0 + 1 + b,
                          d3, d3mark, d3list, d2, d2mark, d2list, d2pos, sal, salmark, sallist)
        # the touched pixels in touch order (unordered: no consumer needs raster order, and a
        # raster scan of the ~44 x 44 bounding box cost ~20 % of this call)
        x0, y0, x1, y1 = w, h, -1, -1
        for j in range(ns):
            o = sallist[j]
            v = sal[o]
            sal[o] = 0.0
            if v > cut:
                pixels[total] = o
                total += 1
                y = o // w
                x = o - y * w
                x0 = min(x0, x)
                x1 = max(x1, x)
                y0 = min(y0, y)
                y1 = max(y1, y)
        if x1 < 0:
            x0, y0 = -1, -1
        bboxes[b, 0] = x0
        bboxes[b, 1] = y0
        bboxes[b, 2] = x1
        bboxes[b, 3] = y1
    offsets[spikes.shape[0]] = total
    return total


# --------------------------------------------------------------------------- python side
#: the gated joint mask lays out the W2 blocks of every ``MASK_BLOCKS_EVERY``-th P1 position
#: (1: all, 0: none) for the per-spike supports, which build the rest themselves: on the
#: overlap pipeline this splits the blocks' cost between the model thread and the helper
MASK_BLOCKS_EVERY = 2


def w3_row_table(w3i: np.ndarray) -> np.ndarray:
    """(k, 7, 128, 48) int16: ``[k, ky, pattern]`` = the sum of ``w3i[k, ky, 6 - j]`` (``w3i``:
    W3 in units of 2^-12 as (k, 7, 7, 48) int16) over the set bits j of ``pattern``, i.e. one
    row of a pool2 cell's D3 for the S3 spikes of that row (:func:`_mask_gated`: bit j =
    column ``qx - 3 + j``).  At most 7 x 4096 < 2^15; 86 KB per class."""
    bits = ((np.arange(128)[:, None] >> np.arange(7)[None, :]) & 1).astype(np.int64)  # (128, 7): bit j
    # column 6 - j for bit j: the kernel's columns reversed
    rows = np.einsum("pj,kyjc->kypc", bits, w3i[:, :, ::-1, :].astype(np.int64))
    return np.ascontiguousarray(rows.astype(np.int16))


def grid_ints(w: np.ndarray) -> np.ndarray | None:
    """Weights in [0, 1] on the 2^-12 grid as int16 units of 2^-12 (the gated decoders' integer
    tables); None for weights off the grid or outside [0, 1] (:func:`model.encoder.quantize_weights`
    puts every encoder's weights there)."""
    q = np.rint(np.asarray(w, np.float64) * 4096.0)
    if not (np.all(q / 4096.0 == w) and q.min(initial=0.0) >= 0 and q.max(initial=0.0) <= 4096):
        return None
    return q.astype(np.int16)


def exact_leak_limit(lam: float) -> np.float32:
    """The largest power of two P such that every float32 ``v < P`` has ``ulp(v)`` dividing ``lam``.

    Then ``v - lam`` is exact for ``lam <= v < P`` (and rounds to a negative number, floored
    to 0, when ``v < lam``), so ``k`` replayed leak steps equal ``max(v - k lam, 0)`` exactly.
    lambda = 1 or 9 (IGARSS) give P = 2^24: always exact; lambda = 0.09 gives P = 2^-3, so
    the kernel replays step by step instead.  ``lam = 0``: no leak, returns 0 (unused).
    """
    lam32 = float(np.float32(lam))
    if lam32 <= 0:
        return np.float32(0.0)
    m, e = math.frexp(lam32)  # lam = m * 2^e, 0.5 <= m < 1, m has <= 24 significant bits
    mant = int(m * (1 << 24))
    low = e - 24
    while mant % 2 == 0:
        mant //= 2
        low += 1
    return np.float32(min(2.0 ** (low + 24), 2.0**100))


@dataclass(frozen=True)
class SparseParams:
    """Neuron and decoder parameters, float32 where the dense path is float32.

    ``theta1/2/3``: per-channel thresholds (> 0, required: with theta <= 0 untouched
    neurons would fire and the event-driven shortcut is wrong).  ``leak``: "subtractive"
    (``lambda1/2`` >= 0) or "multiplicative" (0 <= ``beta1/2`` <= 1); Conv3 is IF.
    """

    theta1: tuple[float, ...]
    theta2: tuple[float, ...]
    theta3: tuple[float, ...]
    leak: str = "subtractive"
    lambda1: float = 9.0
    lambda2: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.9
    fire_once: bool = False
    binary_input: bool = True
    decoder_threshold: float = 0.0
    decoder_gate: bool = True
    decoder_eps: float = 0.0

    def __post_init__(self) -> None:
        for name in ("theta1", "theta2", "theta3"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"{name} has a value <= 0; the sparse path needs thresholds > 0")
        if self.leak not in ("subtractive", "multiplicative"):
            raise ValueError(f"leak {self.leak!r} is not allowed; use 'subtractive' or 'multiplicative'")
        if min(self.lambda1, self.lambda2) < 0:
            raise ValueError("lambda1/lambda2 < 0 is not allowed; a negative leak would let idle neurons fire")
        if not (0 <= self.beta1 <= 1 and 0 <= self.beta2 <= 1):
            raise ValueError("beta1/beta2 outside 0..1 is not allowed")
        if self.decoder_threshold < 0 or self.decoder_eps < 0:
            raise ValueError("decoder_threshold and decoder_eps must be >= 0")


def params_from_config(cfg: Any, decoder_eps: float = 0.0) -> SparseParams:
    """:class:`SparseParams` from a ``model.config.ModelConfig`` (per-channel thetas expanded)."""

    def exp(v: Any, n: int) -> tuple[float, ...]:
        vals = tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)
        return vals * n if len(vals) == 1 else vals

    return SparseParams(
        theta1=exp(cfg.theta1, 4), theta2=exp(cfg.theta2, 36), theta3=exp(cfg.theta3, cfg.n_classes),
        leak=cfg.leak, lambda1=cfg.lambda1, lambda2=cfg.lambda2, beta1=cfg.beta1, beta2=cfg.beta2,
        fire_once=cfg.fire_once, binary_input=cfg.input_mode == "binary",
        decoder_threshold=cfg.decoder_threshold, decoder_gate=cfg.decoder_gate, decoder_eps=decoder_eps,
    )


class _Grid(NamedTuple):
    c_in: int
    h: int
    w: int
    h2: int
    w2: int
    h4: int
    w4: int


@dataclass
class SparseState:
    """Membranes (float32, channels-last, flat), last-update steps per 2-D position, fire-once
    masks, the step counter ``t`` (steps since reset), and per-stream scratch buffers.

    ``v1`` is (H, W, 4) flattened; ``v2`` (H/2, W/2, 36); ``v3`` (H/4, W/4, n_classes).  A
    neuron's true membrane at step ``t`` is ``v`` leaked ``t - 1 - last`` more steps
    (:meth:`SparseSpikeSEG.membranes` gives the dense, up-to-date view).
    """

    grid: _Grid
    v: list[np.ndarray]
    last: list[np.ndarray]
    fired: list[np.ndarray]
    t: int = 0
    stamp: int = 0
    scratch: dict[str, np.ndarray] = field(default_factory=dict)
    rec1: np.ndarray | None = None  # Conv1 state as C1_DTYPE records; v[0] and last[0] are views of it
    #: the pooling lists that the decoders read (:data:`BANK_KEYS`), one set per bank; step ``t``
    #: writes bank ``t % len(banks)``.  ``n`` banks let one thread decode step t (per-spike
    #: supports, :meth:`SparseSpikeSEG.spike_supports` with its :class:`PoolRef`) while
    #: another runs steps t + 1 .. t + n - 1.  A bank also holds the step's W2 blocks
    #: (``blk``/``bslot``/``bmark``, laid out by the gated joint mask; ``bready``: the step
    #: whose blocks are complete; ``bgrow``: slots to allocate at the bank's next step).
    banks: list[dict[str, np.ndarray]] = field(default_factory=list)
    ref: "PoolRef | None" = None  # the last step's pooling lists


#: Pooling outputs a decode reads after the step (per layer 1, 2); the rest of the pooling
#: scratch is only used inside ``_pool`` and is shared by the banks.
BANK_KEYS = ("head", "hmark", "next", "pbeg", "ppos", "pch", "pval", "poffo")


class PoolRef(NamedTuple):
    """One step's pooling lists, for decoding that step: its index ``t`` (the marks in
    ``bank`` equal ``t`` where that step pooled a spike), the bank and the entry counts.
    Valid until step ``t + len(state.banks)`` overwrites the bank."""

    t: int
    bank: dict[str, np.ndarray]
    n_p1: int
    n_p2: int


class SparseOutput(NamedTuple):
    """One step's result.

    ``s1``/``s2``/``s3``: spikes as flat channels-last indices ``(y * W_l + x) * C_l + c``;
    ``p1``/``p2``: pooled entries (flat pooled position, channel, first-spike window offset
    0..3) as an (n, 3) int64 array (None after ``step(..., entries=False)``); ``mask``:
    (H, W) uint8 raw mask (0 = background, k = class k) or an all-zero mask without S3
    spikes; ``layer_spikes``: counts per layer;
    ``t``: the step's index since reset; ``lit``: the flat indices of the mask's non-zero
    pixels (unordered; the window consumes them instead of scanning the mask).
    """

    s1: np.ndarray
    s2: np.ndarray
    s3: np.ndarray
    p1: np.ndarray | None
    p2: np.ndarray | None
    mask: np.ndarray
    layer_spikes: dict[str, int]
    t: int
    lit: np.ndarray


def _entries(pb: dict[str, np.ndarray], layer: str, n: int) -> np.ndarray:
    """(n, 3) int64 pooled entries (position, channel, window offset) of pool ``layer``
    (column writes: ``np.stack`` cost ~18 µs of Python per call)."""
    out = np.empty((n, 3), np.int64)
    out[:, 0] = pb["ppos" + layer][:n]
    out[:, 1] = pb["pch" + layer][:n]
    out[:, 2] = pb["poffo" + layer][:n]
    return out


def _as_np_f32(w: Any) -> np.ndarray:
    if hasattr(w, "detach"):
        w = w.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32))


class SparseSpikeSEG:
    """Event-driven SpikeSEG encoder + decoder for one stream (batch 1).

    ``w1`` (4, C_in, 5, 5), ``w2`` (36, 4, 5, 5), ``w3`` (n_classes, 36, 7, 7): torch tensors
    or numpy arrays; they are copied, so call :meth:`set_weights` after learning changes them.
    """

    def __init__(self, w1: Any, w2: Any, w3: Any, params: SparseParams) -> None:
        self.params = params
        self.set_weights(w1, w2, w3)

    @classmethod
    def from_encoder(cls, encoder: Any, decoder_eps: float = 0.0) -> "SparseSpikeSEG":
        """Build from a ``model.encoder.Encoder``: its weights, its per-channel thresholds (which
        a loaded checkpoint may have adapted: ``model.checkpoint.apply_checkpoint``) and the
        rest of its config, so that both paths run the same network."""
        p = params_from_config(encoder.cfg, decoder_eps)
        th = [tuple(float(v) for v in getattr(encoder, f"theta{i}").detach().cpu().reshape(-1).tolist())
              for i in (1, 2, 3)]
        return cls(encoder.w1, encoder.w2, encoder.w3, replace(p, theta1=th[0], theta2=th[1], theta3=th[2]))

    def set_weights(self, w1: Any, w2: Any, w3: Any) -> None:
        """Copy the weights into the kernels' float64 channels-last layouts."""
        w1n, w2n, w3n = _as_np_f32(w1), _as_np_f32(w2), _as_np_f32(w3)
        if w1n.shape[0] != 4 or w1n.shape[1] not in (1, 2) or w1n.shape[2:] != (5, 5):
            raise ValueError(f"w1 shape {w1n.shape} is not allowed; expected (4, 1|2, 5, 5)")
        if w2n.shape != (36, 4, 5, 5):
            raise ValueError(f"w2 shape {w2n.shape} is not allowed; expected (36, 4, 5, 5)")
        if w3n.ndim != 4 or w3n.shape[1:] != (36, 7, 7):
            raise ValueError(f"w3 shape {w3n.shape} is not allowed; expected (n_classes, 36, 7, 7)")
        p = self.params
        if len(p.theta1) != 4 or len(p.theta2) != 36 or len(p.theta3) != w3n.shape[0]:
            raise ValueError("theta1/2/3 lengths must be 4, 36 and n_classes")
        self.c_in = w1n.shape[1]
        self.n_classes = w3n.shape[0]
        f64 = np.float64
        # encoder: (ci, K, K, co) so the scatter's inner loop runs over contiguous outputs
        self._e1 = np.ascontiguousarray(w1n.transpose(1, 2, 3, 0).astype(f64))
        # float32 currents: exact for Conv2/Conv3 (binary inputs, weights on the 2^-12 grid in
        # [0, 1], at most 36 x 49 terms; see model.encoder.quantize_weights), half the bytes
        self._e2 = np.ascontiguousarray(w2n.transpose(1, 2, 3, 0).astype(np.float32))
        self._e3 = np.ascontiguousarray(w3n.transpose(1, 2, 3, 0).astype(np.float32))
        # decoder (transposed convs): W3 (k, K, K, 36), W2 (36, K, K, 4), K1 = sum_cin W1 (4, K, K)
        self._d3 = np.ascontiguousarray(w3n.transpose(0, 2, 3, 1).astype(f64))
        self._d2 = np.ascontiguousarray(w2n.transpose(0, 2, 3, 1).astype(f64))
        # the gated decoders' integer tables (units of 2^-12; _dot4, _gather_cell): W2 with a
        # zero border (branch-free gathers), W3 rows padded to 48 channels, W3's row sums.
        # Weights off the grid (a caller's own; every encoder quantizes) only run ungated, on
        # the float64 tables: the tables stay empty
        w2i, w3i = grid_ints(w2n), grid_ints(w3n)
        n_w3 = 0
        if w2i is None or w3i is None:
            if p.decoder_gate:
                raise ValueError("w2/w3 have weights off the 2^-12 grid or outside [0, 1], which the gated decoder "
                                 "does not take; pass them through model.encoder.quantize_weights")
        else:
            n_w3 = self.n_classes
        self._w2i = np.zeros((36 if n_w3 else 0, 7, 7, 4), np.int16)
        self._w3i = np.zeros((n_w3, 7, 7, _CP), np.int16)
        if n_w3:
            self._w2i[:, 1:6, 1:6, :] = w2i.transpose(0, 2, 3, 1)
            self._w3i[..., :36] = w3i.transpose(0, 2, 3, 1)
        self._d3rows = w3_row_table(self._w3i)
        self._k1 = np.ascontiguousarray(w1n.astype(f64).sum(axis=1)[..., None])
        self._th = [np.asarray(getattr(p, f"theta{i}"), dtype=np.float32) for i in (1, 2, 3)]
        mode = LEAK_CODES[p.leak]
        self._modes = (mode, mode, LEAK_CODES["none"])
        self._lams = (np.float32(p.lambda1), np.float32(p.lambda2), np.float32(0.0))
        self._betas = (np.float32(p.beta1), np.float32(p.beta2), np.float32(1.0))
        self._exact = tuple(exact_leak_limit(float(lam)) for lam in self._lams)

    # ------------------------------------------------------------------ state
    def fresh_state(self, height: int, width: int, banks: int = 1) -> SparseState:
        """All-zero state for an ``height`` x ``width`` sensor (H, W >= 4).

        ``banks`` = n (1 .. 4) keeps n sets of pooling lists (:class:`PoolRef`), so that a step's
        supports can be decoded while the next n - 1 steps run (~12 MB each at 346x260)."""
        if not 1 <= banks <= 4:
            raise ValueError(f"banks={banks} is not allowed; use 1 .. 4")
        if height < 4 or width < 4:
            raise ValueError(f"sensor {width}x{height} is too small; the model needs H, W >= 4")
        h, w = height, width
        h2, w2 = h // 2, w // 2
        h4, w4 = h2 // 2, w2 // 2
        g = _Grid(self.c_in, h, w, h2, w2, h4, w4)
        chans = (4, 36, self.n_classes)
        sizes = ((h, w), (h2, w2), (h4, w4))
        v = [np.zeros(a * b * c, np.float32) for (a, b), c in zip(sizes, chans)]
        last = [np.full(a * b, -1, np.int64) for a, b in sizes]
        rec1 = np.zeros(h * w, C1_DTYPE)
        rec1["last"] = -1
        rec1["mark"] = -1
        v[0] = rec1["v"]  # (H*W, 4) views of the records (membranes() reads them)
        last[0] = rec1["last"]
        fo = self.params.fire_once
        fired = [np.zeros(a * b * c if fo else 1, np.uint8) for (a, b), c in zip(sizes, chans)]
        i64, f64 = np.int64, np.float64
        sc: dict[str, np.ndarray] = {
            "a_pos": np.zeros(self.c_in * h * w, i64), "a_ch": np.zeros(self.c_in * h * w, i64),
            "a_val": np.zeros(self.c_in * h * w, np.float32), "count": np.zeros(self.c_in * h * w, np.int32),
        }
        for i, ((a, b), c) in enumerate(zip(sizes, chans), start=1):
            if i > 1:  # Conv1 keeps its current and mark in the records (rec1)
                sc[f"cur{i}"] = np.zeros(a * b * c, np.float32)
                sc[f"mark{i}"] = np.full(a * b, -1, i64)
            sc[f"touched{i}"] = np.zeros(a * b + 1, i64)  # + 1: the layers' branch-free listing
            sc[f"spk{i}"] = np.zeros(a * b * c + c, i64)  # + c: _layer's branch-free compaction
        for i, ((a, b), c) in enumerate(zip(sizes[1:], chans[:2]), start=1):
            n = a * b * c
            sc[f"pbits{i}"] = np.zeros(a * b, np.uint64)  # valid where the bank's hmark == t: no reset
            sc[f"poff{i}"] = np.zeros(n, np.int8)
            sc[f"head{i}"] = np.zeros(a * b, i64)
            sc[f"qlist{i}"] = np.zeros(a * b, i64)
            sc[f"pbeg{i}"] = np.zeros(a * b, i64)
            sc[f"hmark{i}"] = np.full(a * b, -1, i64)
            sc[f"next{i}"] = np.zeros(n, i64)
            sc[f"ppos{i}"] = np.zeros(n, i64)
            sc[f"pch{i}"] = np.zeros(n, i64)
            sc[f"pval{i}"] = np.zeros(n, np.float32)
            sc[f"poffo{i}"] = np.zeros(n, i64)
        sc["d3"] = np.zeros(h4 * w4 * 36, f64)
        sc["d3mark"] = np.full(h4 * w4, -1, i64)
        sc["d3list"] = np.zeros(h4 * w4, i64)
        sc["d3q"] = np.zeros(h4 * w4 * _CP, np.int32)  # _mask_gated: D3 per pool2 cell, all channels (units of 2^-12)
        sc["d3h"] = np.zeros(h4 * w4 * _CP, np.int16)  # ... and its int16 halves (_D3_SHIFT)
        sc["d3l"] = np.zeros(h4 * w4 * _CP, np.int16)
        sc["d3big"] = np.zeros(h4 * w4, np.bool_)
        sc["d3qmark"] = np.full(h4 * w4, -1, i64)  # ... computed at this stamp
        sc["s3bits"] = np.zeros((h4, (w4 + 6) // 64 + 2), np.uint64)  # S3 rows as bits (_mask_gated)
        sc["d2"] = np.zeros(h2 * w2 * 4, f64)
        sc["d2mark"] = np.full(h2 * w2, -1, i64)
        sc["d2list"] = np.zeros(h2 * w2, i64)
        sc["d2pos"] = np.zeros(h2 * w2, i64)
        sc["sal"] = np.zeros(h * w, f64)
        sc["salmark"] = np.full(h * w, -1, i64)
        sc["sallist"] = np.zeros(h * w, i64)
        sc["loc"] = np.zeros((40, 40), f64)  # one spike's pixel crop (_support_one), zero between calls
        sc["best"] = np.zeros(h * w, f64)
        sc["bestmark"] = np.full(h * w, -1, i64)
        sc["lit"] = np.zeros(h * w, i64)
        bank0 = {f"{k}{i}": sc.pop(f"{k}{i}") for k in BANK_KEYS for i in (1, 2)}  # one home: the banks
        more = [{k: np.full_like(a, -1) if k.startswith("hmark") else np.zeros_like(a) for k, a in bank0.items()}
                for _ in range(banks - 1)]
        for bank in (bank0, *more):  # the step's W2 blocks (_mask_gated lays them out, _support_one reads them)
            bank["blk"] = np.empty(128 * BLOCK_SLOT, np.int16)  # 128 P1 positions; grown by _decode_mask
            bank["bslot"] = np.zeros(h2 * w2, i64)
            bank["bmark"] = np.full(h2 * w2, -1, i64)
            bank["bgrow"] = np.zeros(1, i64)
            bank["bready"] = np.full(1, -1, i64)  # the step whose blocks are complete
        sc["nbs"] = np.zeros(2, i64)
        return SparseState(grid=g, v=v, last=last, fired=fired, scratch=sc, rec1=rec1, banks=[bank0, *more])

    def reset_state(self, state: SparseState) -> SparseState:
        """``state`` back to what :meth:`fresh_state` makes (same size and banks), in place.

        A fresh state is ~57-68 MB of arrays at 346x260 (sized for every neuron spiking):
        10-22 ms, mostly page faults, and more faults in its first steps (a node reset cost
        ~6 % of a 600-step run).  This refills only what a step reads before writing:
        membranes, last-update steps, fire-once masks and the marks compared with the step
        counter (which restarts at 0).  Marks compared with decode stamps stay as they are:
        ``state.stamp`` keeps counting, so no old mark matches a new stamp.  The buffers a
        step leaves all zero (currents, event counts, crops, bit rows) are zero already.
        """
        for v in state.v[1:]:
            v[:] = 0.0
        for last in state.last[1:]:
            last[:] = -1
        rec1 = state.rec1
        if rec1 is not None:
            rec1["cur"] = 0.0
            rec1["v"] = 0.0
            rec1["last"] = -1
            rec1["mark"] = -1
        for f in state.fired:
            f[:] = 0
        sc = state.scratch
        for k in ("mark2", "mark3"):
            sc[k][:] = -1
        for bank in state.banks:
            bank["hmark1"][:] = -1
            bank["hmark2"][:] = -1
            bank["bmark"][:] = -1
            bank["bready"][0] = -1
        state.t = 0
        state.ref = None
        return state

    # ------------------------------------------------------------------ step
    def step(
        self, x: Any, state: SparseState | None, events: np.ndarray | None = None, decode: bool = True,
        entries: bool = True,
    ) -> tuple[SparseOutput, SparseState]:
        """One time step.

        ``x``: the step's (C_in, H, W) or (1, C_in, H, W) count frame (CPU torch tensor or
        numpy), or ``None`` when ``events`` (an ``EVENT_DTYPE`` array of this bin, with the
        sensor size taken from ``state``) is given instead; events and frame give identical
        results when the frame was binned from those events.  ``state=None`` starts fresh
        (a frame is then required for the size).  Returns (output, state) with ``state``
        updated in place.  ``decode=False`` leaves the mask empty: call :meth:`decode_mask`
        (e.g. on one thread while :meth:`spike_supports` runs on another).  ``entries=False``
        leaves ``p1``/``p2`` out (None): nothing in the pipeline reads them, and gathering
        them cost ~15 µs per step at 346x260 (:meth:`pooling_indices` needs them).
        """
        sc: dict[str, np.ndarray]
        if x is not None:
            if hasattr(x, "detach"):
                x = x.detach()
                if x.device.type != "cpu":
                    raise ValueError("the sparse path runs on CPU; pass a CPU frame (use path: dense on GPU)")
                x = x.numpy()
            x = np.asarray(x)
            if x.ndim == 4:
                if x.shape[0] != 1:
                    raise ValueError(f"the sparse path takes batch 1, got input of shape {x.shape}")
                x = x[0]
            if x.ndim != 3 or x.shape[0] != self.c_in:
                raise ValueError(f"input of shape {x.shape} is not allowed; expected ({self.c_in}, H, W)")
            if state is None:
                state = self.fresh_state(x.shape[1], x.shape[2])
            elif (x.shape[1], x.shape[2]) != (state.grid.h, state.grid.w):
                raise ValueError(f"input size {x.shape[2]}x{x.shape[1]} differs from the state's; reset the state")
        elif events is None or state is None:
            raise ValueError("step needs a frame, or events together with an existing state")
        g = state.grid
        sc = state.scratch
        p = self.params
        if x is not None:
            frame = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)  # C*H*W is even (H, W >= 4)
            n_in = _active_from_frame(frame, frame.view(np.uint64), g.h * g.w, p.binary_input,
                                      sc["a_pos"], sc["a_ch"], sc["a_val"])
        else:
            n_in = _active_from_events(
                events["x"], events["y"], events["polarity"], g.c_in, g.h, g.w, p.binary_input,
                sc["count"], sc["a_pos"], sc["a_ch"], sc["a_val"],
            )
        t = state.t
        pb = state.banks[t % len(state.banks)]
        fo = p.fire_once
        n1, np1, n2, np2, n3 = _encode_layers(
            sc["a_pos"], sc["a_ch"], sc["a_val"], n_in, t, fo, g.h, g.w, g.h2, g.w2, g.h4, g.w4,
            self._e1, state.rec1, state.fired[0], sc["touched1"], sc["spk1"],
            self._th[0], self._modes[0], self._lams[0], self._betas[0], self._exact[0],
            sc["pbits1"], sc["poff1"], sc["qlist1"],
            pb["head1"], pb["hmark1"], pb["next1"], pb["ppos1"], pb["pch1"], pb["pval1"], pb["poffo1"], pb["pbeg1"],
            self._e2, sc["cur2"], state.v[1], state.last[1], state.fired[1], sc["mark2"], sc["touched2"], sc["spk2"],
            self._th[1], self._modes[1], self._lams[1], self._betas[1], self._exact[1],
            sc["pbits2"], sc["poff2"], sc["qlist2"],
            pb["head2"], pb["hmark2"], pb["next2"], pb["ppos2"], pb["pch2"], pb["pval2"], pb["poffo2"], pb["pbeg2"],
            self._e3, sc["cur3"], state.v[2], state.last[2], state.fired[2], sc["mark3"], sc["touched3"], sc["spk3"],
            self._th[2], self._exact[2],
        )
        s3 = sc["spk3"][:n3].copy()  # sorted by _encode_layers
        state.ref = PoolRef(t, pb, int(np1), int(np2))
        mask = np.zeros((g.h, g.w), np.uint8)
        state.t = t + 1
        n_lit = self._decode_mask(s3, mask, state) if n3 and decode else 0
        return SparseOutput(
            s1=sc["spk1"][:n1].copy(), s2=sc["spk2"][:n2].copy(), s3=s3,
            p1=_entries(pb, "1", np1) if entries else None,
            p2=_entries(pb, "2", np2) if entries else None,
            mask=mask,
            layer_spikes={"conv1": int(n1), "pool1": int(np1), "conv2": int(n2), "pool2": int(np2), "conv3": int(n3)},
            t=t,
            lit=sc["lit"][:n_lit].copy(),
        ), state

    # ------------------------------------------------------------------ decoder
    @staticmethod
    def _ref(state: SparseState) -> PoolRef:
        if state.ref is None:
            raise ValueError("no step to decode yet; call step() first")
        return state.ref

    def _next_stamp(self, state: SparseState) -> int:
        state.stamp += 1
        return state.stamp

    def decode_spikes(
        self, state: SparseState, cls: int, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Saliency of class ``cls`` from S3 spikes at ``positions`` (flat y*W/4+x), this step.

        Must be called after :meth:`step` and before the next one (it reads the step's
        pooling entries).  Returns (pixel flat indices, saliency values float64, Conv2-grid
        support positions with positive D2).  The decoder is linear in S3, so decoding one
        spike at a time and summing gives the joint saliency (up to float rounding).
        """
        g = state.grid
        sc = state.scratch
        ref = self._ref(state)
        pb = ref.bank
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        stamp = self._next_stamp(state)
        nd, ns = _decode(
            pos, len(pos), int(cls), self._d3, self._d2, self._k1, g.w4, g.h2, g.w2, g.h, g.w,
            pb["head2"], pb["hmark2"], pb["next2"], pb["ppos2"], pb["pch2"], pb["poffo2"], ref.n_p2,
            pb["head1"], pb["hmark1"], pb["next1"], pb["pch1"], pb["poffo1"],
            ref.t, self.params.decoder_gate, stamp,
            sc["d3"], sc["d3mark"], sc["d3list"], sc["d2"], sc["d2mark"], sc["d2list"], sc["d2pos"],
            sc["sal"], sc["salmark"], sc["sallist"],
        )
        pix = sc["sallist"][:ns].copy()
        vals = sc["sal"][pix].copy()
        sc["sal"][pix] = 0.0
        return pix, vals, sc["d2pos"][:nd].copy()

    def decode_mask(self, out: SparseOutput, state: SparseState) -> SparseOutput:
        """``out`` of ``step(..., decode=False)`` with its mask (and ``lit``) decoded; same step, once.

        The mask is written into ``out.mask`` (all zeros after ``decode=False``)."""
        n_lit = self._decode_mask(out.s3, out.mask, state) if len(out.s3) else 0
        # positional, not ``_replace`` (~2 µs of Python per step); ``lit`` is the last field
        return SparseOutput(*out[:-1], state.scratch["lit"][:n_lit].copy())

    def decode_scratch(self, state: SparseState) -> dict[str, np.ndarray]:
        """Private decoder buffers for :meth:`spike_supports` on another thread (same state)."""
        sc = state.scratch
        keys = ("d3", "d3mark", "d3list", "d2", "d2mark", "d2list", "d2pos", "sal", "salmark", "sallist", "loc")
        own = {k: np.full_like(sc[k], -1) if k.endswith("mark") else np.zeros_like(sc[k]) for k in keys}
        own["stamp"] = np.zeros(1, np.int64)  # stamps are compared with this scratch's marks only
        return own

    def spike_supports(
        self, state: SparseState, spikes: np.ndarray, scratch: dict[str, np.ndarray] | None = None,
        at: PoolRef | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-spike decoded supports for the step just run (HULK: one-hot S3 per spike).

        ``spikes``: flat channels-last S3 indices (a subset of ``out.s3``).  Returns
        (offsets (B + 1,), pixels (flat y*W+x), bboxes (B, 4) inclusive x0, y0, x1, y1 or -1s):
        instance b is ``pixels[offsets[b]:offsets[b + 1]]``, the pixels whose saliency from
        that spike alone exceeds ``decoder_threshold + decoder_eps``.  One compiled call
        for all spikes; cost ~ one small decode per spike, not B dense decoders.
        ``scratch``: buffers from :meth:`decode_scratch`, so that this call may run on
        another thread concurrently with :meth:`decode_mask` or another ``spike_supports``
        with its own scratch (the step's pooling lists are only read); None = the state's.
        ``at``: the step to decode (``state.ref`` just after its :meth:`step`); None = the
        last step.  With ``n`` banks (``fresh_state(..., banks=n)``) and its own scratch, this
        may run while the next ``n - 1`` :meth:`step` calls run on another thread.  It reads
        the W2 blocks that :meth:`decode_mask` laid out in the step's bank once that pass is
        complete; before, it builds its own (same supports).
        """
        args, (offsets, pixels, bboxes) = self.supports_args(state, spikes, scratch, at)
        total = _decode_batch(*args)
        return offsets, pixels[:total].copy(), bboxes

    def supports_args(
        self, state: SparseState, spikes: np.ndarray, scratch: dict[str, np.ndarray] | None = None,
        at: PoolRef | None = None,
    ) -> tuple[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The arguments of :func:`_decode_batch` for :meth:`spike_supports` (same parameters),
        and its output arrays (offsets, pixel buffer, bboxes): for compiled callers that run the
        supports and what consumes them in one call (``model.instances.sparse_hulk``)."""
        g = state.grid
        sc = state.scratch
        ref = self._ref(state) if at is None else at
        pb = ref.bank
        own = sc if scratch is None else scratch
        p = self.params
        spk = np.ascontiguousarray(spikes, dtype=np.int64)
        b = len(spk)
        offsets = np.empty(b + 1, np.int64)  # the kernels write every entry of both
        bboxes = np.empty((b, 4), np.int64)
        # a spike's support is at most its receptive field: 7x7 at H/4 -> about 42 x 42 pixels
        need = max(1, b * 44 * 44)
        pixels = own.get("pixels")
        if pixels is None or len(pixels) < need:  # kept: a fresh 1 MB buffer per step cost ~20 us
            pixels = own["pixels"] = np.empty(need, np.int64)  # only [:total] is written and read
        # W2 blocks of the pooled Conv1 cells the gated supports visit (_support_one): 9 x 4 x 48
        # int16 per cell; grown when the last call ran out of slots (those cells were
        # gathered without blocks: same result, slower)
        nsl = own.get("nsl")
        blk = own.get("blk")
        if nsl is None or blk is None or nsl[1] > 0:
            cells = max(128, 2 * int(nsl[0] + nsl[1])) if nsl is not None else 128
            blk = own["blk"] = np.empty(cells * BLOCK_SLOT, np.int16)
            nsl = own["nsl"] = np.zeros(2, np.int64)
        nsl[:] = 0
        rows = own.get("p1rows")
        if rows is None or len(rows[0]) != g.h2 + 1:  # active pooled Conv1 cells by row (_active_rows)
            rows = own["p1rows"] = (np.zeros(g.h2 + 1, np.int64), np.zeros(g.h2 * g.w2, np.int64))
        if scratch is None:
            stamp0 = state.stamp
            state.stamp += b + 1
        else:
            stamp0 = int(own["stamp"][0])
            own["stamp"][0] = stamp0 + b + 1
        # the joint mask's W2 blocks, once its pass over this step is complete (a call on another
        # thread while decode_mask runs builds its own)
        shared = bool(pb["bready"][0] == ref.t)
        args = (
            spk, self.n_classes, float(p.decoder_threshold) + float(p.decoder_eps),
            self._d3, self._d2, self._k1, g.w4, g.h2, g.w2, g.h, g.w,
            pb["head2"], pb["hmark2"], pb["next2"], pb["ppos2"], pb["pch2"], pb["poffo2"], ref.n_p2, pb["pbeg2"],
            pb["head1"], pb["hmark1"], pb["next1"], pb["pch1"], pb["poffo1"],
            ref.t, p.decoder_gate, stamp0,
            own["d3"], own["d3mark"], own["d3list"], own["d2"], own["d2mark"], own["d2list"], own["d2pos"],
            own["sal"], own["salmark"], own["sallist"], offsets, pixels, bboxes, own["loc"], self._w2i,
            self._w3i, blk, nsl, pb["ppos1"], ref.n_p1, rows[0], rows[1], pb["blk"], pb["bslot"], pb["bmark"], shared,
        )
        return args, (offsets, pixels, bboxes)

    def _decode_mask(self, s3: np.ndarray, mask: np.ndarray, state: SparseState) -> int:
        """Write the step's raw mask into ``mask``; returns the number of lit pixels (listed in ``scratch['lit']``)."""
        g = state.grid
        sc = state.scratch
        p = self.params
        cut = float(p.decoder_threshold) + float(p.decoder_eps)
        stamp0 = self._next_stamp(state)
        n_cls = self.n_classes
        flat = mask.reshape(-1)
        ref = self._ref(state)
        pb = ref.bank
        t = ref.t
        n_lit = 0
        nbs = sc["nbs"]  # W2 block slots used in the bank / P1 positions left without one
        nbs[:] = 0
        grow = pb["bgrow"]  # the bank's last step ran out of block slots: room for twice as many
        if grow[0] > 0:
            pb["blk"] = np.empty(int(grow[0]) * BLOCK_SLOT, np.int16)
            grow[0] = 0
        for k in range(n_cls):
            sel = s3 if n_cls == 1 else s3[s3 % n_cls == k] // n_cls
            if len(sel) == 0:
                continue
            stamp = self._next_stamp(state)
            if p.decoder_gate:
                n_lit = _mask_gated(
                    np.ascontiguousarray(sel), len(sel), k, self._d3rows, self._w2i, self._k1, g.w4, g.h4, g.w2, g.h, g.w,
                    pb["head2"], pb["hmark2"], pb["pbeg2"], pb["pch2"], pb["poffo2"],
                    pb["ppos1"], ref.n_p1, pb["head1"], pb["next1"], pb["pch1"], pb["poffo1"],
                    t, stamp, sc["s3bits"], sc["d3q"], sc["d3h"], sc["d3l"], sc["d3big"], sc["d3qmark"], sc["sal"],
                    sc["salmark"], sc["sallist"], flat, sc["best"], sc["bestmark"], stamp0, cut, sc["lit"], n_lit,
                    pb["blk"], pb["bslot"], pb["bmark"], sc["nbs"], MASK_BLOCKS_EVERY,
                )
                continue
            _nd, ns = _decode(
                sel, len(sel), k, self._d3, self._d2, self._k1, g.w4, g.h2, g.w2, g.h, g.w,
                pb["head2"], pb["hmark2"], pb["next2"], pb["ppos2"], pb["pch2"], pb["poffo2"], ref.n_p2,
                pb["head1"], pb["hmark1"], pb["next1"], pb["pch1"], pb["poffo1"],
                t, p.decoder_gate, stamp,
                sc["d3"], sc["d3mark"], sc["d3list"], sc["d2"], sc["d2mark"], sc["d2list"], sc["d2pos"],
                sc["sal"], sc["salmark"], sc["sallist"],
            )
            n_lit = _mask_into(flat, sc["best"], sc["bestmark"], stamp0, k, sc["sal"], sc["sallist"], ns, cut,
                               sc["lit"], n_lit)
        if nbs[1] > 0:  # grown at this bank's next step (this step's supports read the blocks laid out now)
            grow[0] = 2 * (nbs[0] + nbs[1])
        if p.decoder_gate:
            pb["bready"][0] = t  # the blocks are complete: supports may read them (supports_args)
        return n_lit

    # ------------------------------------------------------------------ dense views (tests, fallback)
    def membranes(self, state: SparseState) -> list[np.ndarray]:
        """Up-to-date membranes as dense (C, H, W) float32 arrays (leak replayed; for tests/handover)."""
        g = state.grid
        out = []
        shapes = ((g.h, g.w, 4), (g.h2, g.w2, 36), (g.h4, g.w4, self.n_classes))
        for i, shp in enumerate(shapes):
            v = state.v[i].reshape(shp).copy()
            k = (state.t - 1 - state.last[i]).reshape(shp[:2])
            mode, lam, beta = self._modes[i], self._lams[i], self._betas[i]
            for _ in range(int(k.max(initial=0))):
                act = (k > 0)[..., None] & (v != 0)
                if not act.any():
                    break
                if mode == 0:
                    v = np.where(act, np.maximum(v - lam, np.float32(0)), v)
                elif mode == 1:
                    v = np.where(act, (v.astype(np.float64) * float(beta)).astype(np.float32), v)
                k = k - 1
            out.append(np.ascontiguousarray(v.transpose(2, 0, 1)))
        return out

    def dense_spikes(self, out: SparseOutput, state: SparseState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """S1, S2, S3 as dense (C, H, W) float32 0/1 arrays."""
        g = state.grid
        res = []
        for s, (h, w, c) in zip((out.s1, out.s2, out.s3), ((g.h, g.w, 4), (g.h2, g.w2, 36), (g.h4, g.w4, self.n_classes))):
            a = np.zeros(h * w * c, np.float32)
            a[s] = 1.0
            res.append(np.ascontiguousarray(a.reshape(h, w, c).transpose(2, 0, 1)))
        return res[0], res[1], res[2]

    def pooling_indices(self, out: SparseOutput, state: SparseState) -> tuple[np.ndarray, np.ndarray]:
        """idx1 (4, H/2, W/2), idx2 (36, H/4, W/4) int64 exactly as ``max_pool2d(return_indices=True)``."""
        if out.p1 is None or out.p2 is None:
            raise ValueError("this output has no pooled entries: it came from step(..., entries=False)")
        g = state.grid
        res = []
        for pe, (hp, wp, c, w) in zip((out.p1, out.p2), ((g.h2, g.w2, 4, g.w), (g.h4, g.w4, 36, g.w2))):
            py, px = np.divmod(np.arange(hp * wp), wp)
            tl = (2 * py * w + 2 * px).reshape(hp, wp)
            idx = np.repeat(tl[None], c, axis=0).astype(np.int64)
            if len(pe):
                qy, qx = np.divmod(pe[:, 0], wp)
                off = pe[:, 2]
                idx[pe[:, 1], qy, qx] = (2 * qy + (off >> 1)) * w + 2 * qx + (off & 1)
            res.append(idx)
        return res[0], res[1]


# --------------------------------------------------------------------------- benchmark
def _bench_inputs(kind: str, h: int, w: int, n_steps: int, seed: int = 0) -> list[np.ndarray]:
    """Benchmark frames (2, H, W) float32: ``noise:<density>`` or ``scene`` (sources/synthetic, 1 ms bins)."""
    rng = np.random.default_rng(seed)
    if kind.startswith("noise:"):
        d = float(kind.split(":")[1])
        return [(rng.random((2, h, w)) < d / 2).astype(np.float32) for _ in range(n_steps)]
    from sources.synthetic import SyntheticConfig, SyntheticScene

    scene = SyntheticScene(SyntheticConfig(width=w, height=h, seed=seed, scene=kind.split(":")[1] if ":" in kind else "mixed"))
    frames = []
    for k in range(1, n_steps + 1):
        ev, _lab = scene.events_until(k * 1000)
        f = np.zeros((2, h, w), np.float32)
        np.add.at(f, (ev["polarity"].astype(np.int64), ev["y"].astype(np.int64), ev["x"].astype(np.int64)), 1.0)
        frames.append(f)
    return frames


def bench(sizes: tuple[tuple[int, int], ...] = ((128, 128), (260, 346), (480, 640)),
          kinds: tuple[str, ...] = ("noise:0.001", "noise:0.01", "noise:0.05", "scene"),
          n_steps: int = 300, dense_steps: int = 30) -> None:
    """Print steps/s of this path vs the dense per-step torch path (channels_last, 2 threads).

    Run: ``python -m model.sparse``.  Both paths run the default ``model`` config (IGARSS
    2023, gabor Conv1, untrained N(0.8, 0.01) W2/W3) on the same frames in this process.
    """
    import time

    import torch

    from model.config import ModelConfig
    from model.decoder import decode_mask
    from model.encoder import Encoder
    from stream.config import build

    torch.set_num_threads(2)
    cfg = build(ModelConfig, {})
    enc = Encoder(cfg, 2).to(memory_format=torch.channels_last)
    sp = SparseSpikeSEG.from_encoder(enc)
    for h, w in sizes:
        for kind in kinds:
            frames = _bench_inputs(kind, h, w, n_steps + 20)
            dens = float(np.mean([(f.sum(0) > 0).mean() for f in frames]))
            st = None
            for f in frames[:20]:
                _o, st = sp.step(f, st)
            tot: dict[str, int] = {}
            t0 = time.perf_counter()
            for f in frames[20:]:
                o, st = sp.step(f, st)
                for key, val in o.layer_spikes.items():
                    tot[key] = tot.get(key, 0) + val
            sps = n_steps / (time.perf_counter() - t0)
            dst = None
            tf = [torch.from_numpy(f)[None].contiguous(memory_format=torch.channels_last) for f in frames[: 20 + dense_steps]]
            with torch.inference_mode():
                for i, f in enumerate(tf):
                    if i == 10:
                        t0 = time.perf_counter()
                    do, dst = enc.step(enc.prepare_input(f), dst)
                    if bool(do.has_spikes):
                        decode_mask(do, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, cfg.decoder_threshold)
            dps = (len(tf) - 10) / (time.perf_counter() - t0)
            per = " ".join(f"{k}={v / n_steps:.0f}" for k, v in tot.items())
            print(f"{w}x{h} {kind:12s} density={dens:.4f} sparse={sps:8.0f}/s dense={dps:6.1f}/s "
                  f"ratio={sps / dps:6.1f}  spikes/step: {per}", flush=True)


if __name__ == "__main__":
    bench()
