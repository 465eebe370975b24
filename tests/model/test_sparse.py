"""The event-driven path against the dense reference (model/encoder.py, model/decoder.py).

Every comparison is exact (spikes, pooling indices, masks); membranes to float rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.decoder import decode_mask
from model.encoder import Encoder
from model.sparse import BLOCK_SLOT, SparseSpikeSEG, exact_leak_limit, params_from_config
from stream.config import build
from stream.events import make_events




pytestmark = pytest.mark.timeout(300)  # first run compiles the numba kernels (cached afterwards)


def _scene(t: int, h: int, w: int, rng: np.random.Generator, noise: float = 0.01) -> np.ndarray:
    """Two moving rectangles' edges (ON leading, OFF trailing) plus uniform noise, (2, H, W)."""
    f = np.zeros((2, h, w), np.float32)
    for x0, y0, vx in ((4, 6, 1), (w // 2, h // 2 - 4, -1)):
        x = (x0 + vx * t) % (w - 20)
        f[1, y0 : y0 + 14, x : x + 2] += 1
        f[0, y0 : y0 + 14, x + 12 : x + 14] += 1
        f[1, y0 : y0 + 2, x : x + 14] += 1
    f += rng.random((2, h, w)) < noise / 2
    return f


def _pair(overrides: dict | None = None, w2: torch.Tensor | None = None, w3: torch.Tensor | None = None):
    cfg = build(ModelConfig, overrides or {})
    enc = Encoder(cfg, 2)
    with torch.no_grad():
        if w2 is not None:
            enc.w2.copy_(w2)
        if w3 is not None:
            enc.w3.copy_(w3)
    return cfg, enc, SparseSpikeSEG.from_encoder(enc)


def _run_both(cfg, enc, sp, frames):
    """Run both paths over ``frames``; yield per step (sparse out, state, dense out)."""
    st = dst = None
    for f in frames:
        out, st = sp.step(f, st)
        dout, dst = enc.step(enc.prepare_input(torch.from_numpy(f)), dst)
        yield out, st, dout, dst


def _assert_same(sp, out, st, dout, cfg, enc, t):
    s1, s2, s3 = sp.dense_spikes(out, st)
    for name, a in (("conv1", s1), ("conv2", s2), ("conv3", s3)):
        b = dout.layer_spikes[name][0].numpy()
        assert np.array_equal(a, b), f"step {t}: {name} differs at {int((a != b).sum())} neurons"
    i1, i2 = sp.pooling_indices(out, st)
    assert np.array_equal(i1, dout.pooling_indices[0][0].numpy()), f"step {t}: idx1 differs"
    assert np.array_equal(i2, dout.pooling_indices[1][0].numpy()), f"step {t}: idx2 differs"
    dm = decode_mask(dout, enc.w1, enc.w2, enc.w3, cfg.decoder_gate, cfg.decoder_threshold)[0].numpy()
    assert np.array_equal(out.mask, dm), f"step {t}: mask differs at {int((out.mask != dm).sum())} pixels"


def test_scene_spikes_indices_masks_identical_to_dense() -> None:
    rng = np.random.default_rng(0)
    cfg, enc, sp = _pair()
    frames = [_scene(t, 48, 64, rng) for t in range(30)]
    n3 = 0
    for t, (out, st, dout, dst) in enumerate(_run_both(cfg, enc, sp, frames)):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        n3 += out.layer_spikes["conv3"]
        for a, b in zip(sp.membranes(st), dst.neurons):
            np.testing.assert_allclose(a, b.v[0].numpy(), rtol=1e-6, atol=1e-5)
    assert n3 > 0, "the scene must drive Conv3, else the decoder comparison is empty"
    assert out.layer_spikes["conv1"] == int(dout.layer_spikes["conv1"].sum())


def test_joint_mask_where_d3_exceeds_int16() -> None:
    """W3 = 1/4 everywhere and Conv3 firing densely: a pool2 cell's D3 (units of 2^-12) is
    1024 x the S3 spikes in its 7 x 7 window, beyond int16 from 32 spikes on, where the joint
    mask splits it into two int16 halves for its integer dot products (``_mask_gated``);
    below, one dot product.  Both kinds of cell occur, and the masks equal the dense decoder's."""
    rng = np.random.default_rng(7)
    cfg, enc, sp = _pair({"theta3": 1.0, "conv1_gain": 40.0}, w3=torch.full((1, 36, 7, 7), 0.25))
    d3 = []
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, [_scene(t, 48, 64, rng) for t in range(12)])):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        window = torch.nn.functional.conv2d(dout.layer_spikes["conv3"][:, :1], torch.ones((1, 1, 7, 7)), padding=3)
        d3.append(1024 * window[dout.layer_spikes["pool2"].sum(1, keepdim=True) > 0])  # at cells with P2 entries
    every = torch.cat(d3)
    assert (every >= 32768).any() and ((every > 0) & (every < 32768)).any(), "both D3 ranges must occur"


@pytest.mark.parametrize("width", [300, 256])
def test_wide_sensor_bitmask_rows_cross_words(width: int) -> None:
    """W/4 >= 64: the joint mask's S3 row bitmasks and Conv3's touched-position rows
    (``_layer_one``'s dilation) span two words; windows near column 64 read both, and at
    W/4 = 64 the last word is full (no tail mask)."""
    rng = np.random.default_rng(5)
    cfg, enc, sp = _pair()
    frames = [_scene(t, 24, width, rng, 0.04) for t in range(12)]
    cols: set[int] = set()
    w4 = width // 4
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, frames)):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        cols |= {int(p) % w4 for p in out.s3 // sp.n_classes}
    assert any(55 <= c <= 63 for c in cols) and any(c >= 64 or c == w4 - 1 for c in cols), sorted(cols)


def _random_setup(quantise: bool):
    g = torch.Generator().manual_seed(1)
    w2 = torch.rand((36, 4, 5, 5), generator=g)
    w3 = torch.rand((2, 36, 7, 7), generator=g) * 0.5
    q = (lambda w: (w * 4096).round() / 4096) if quantise else (lambda w: w)  # noqa: E731
    cfg, enc, sp = _pair({"input_mode": "count", "n_classes": 2, "decoder_gate": False,
                          "theta2": 12.0, "theta3": 40.0}, q(w2), q(w3))
    with torch.no_grad():
        enc.w1.copy_(q(enc.w1))
    return cfg, enc, SparseSpikeSEG.from_encoder(enc)


def _random_frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(_scene(t, 32, 40, rng, 0.03) * rng.integers(1, 4, (2, 32, 40))).astype(np.float32) for t in range(n)]


@pytest.mark.parametrize("seed", [11, 12])
def test_arbitrary_then_quantized_weights_gated_binary_scene_and_noise(seed: int) -> None:
    """The exactness contract (model.encoder.quantize_weights): arbitrary random weights, put on
    the 2^-12 grid, default gated binary decoder, two classes, scene + noise input, many
    steps: spikes, indices and masks identical (the float32 dense path is then exact)."""
    from model.encoder import quantize_weights

    g = torch.Generator().manual_seed(seed)
    w2 = quantize_weights(torch.rand((36, 4, 5, 5), generator=g) * 0.7 + 0.3)
    w3 = quantize_weights(torch.rand((2, 36, 7, 7), generator=g))
    cfg, enc, sp = _pair({"n_classes": 2, "theta3": 25.0, "lambda1": 3.0}, w2, w3)
    rng = np.random.default_rng(seed)
    frames = [_scene(t, 40, 56, rng, 0.02 + 0.04 * (t % 3 == 0)) for t in range(70)]
    n3 = 0
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, frames)):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        n3 += out.layer_spikes["conv3"]
    assert n3 > 50


def test_random_grid_weights_count_input_ungated_many_steps() -> None:
    """Weights on a 2^-12 grid: float32 conv sums are exact, so the current dense path must match."""
    cfg, enc, sp = _random_setup(quantise=True)
    n3 = 0
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, _random_frames(90))):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        n3 += out.layer_spikes["conv3"]
    assert n3 > 0


class _F64Conv:
    """torch.nn.functional with conv2d accumulating in float64 and rounding once to float32."""

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def conv2d(x: torch.Tensor, w: torch.Tensor, padding: int = 0) -> torch.Tensor:
        return torch.nn.functional.conv2d(x.double(), w.double(), padding=padding).float()


def test_arbitrary_float_weights_match_float64_accumulating_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arbitrary float32 weights: torch's float32 conv is not correctly rounded (this seed
    flips one Conv2 spike at step 80: exact sum 12.99999988 rounds to 13.0, torch gives
    12.999999046); a dense conv accumulating in float64 matches bit for bit."""
    import model.encoder

    monkeypatch.setattr(model.encoder, "F", _F64Conv())
    cfg, enc, sp = _random_setup(quantise=False)
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, _random_frames(120))):
        _assert_same(sp, out, st, dout, cfg, enc, t)


def test_exact_threshold_ties_with_dyadic_weights() -> None:
    """Weights on a 1/8 grid make every sum exact, so V lands exactly on theta: ties must match."""
    rng = np.random.default_rng(2)
    w2 = torch.full((36, 4, 5, 5), 0.625)
    w3 = torch.full((1, 36, 7, 7), 0.25)
    cfg, enc, sp = _pair({"theta2": 5.0, "lambda2": 0.625, "theta3": 10.0}, w2, w3)
    # Conv1 kernels on a 1/8 grid too (the gabor ones are not dyadic)
    w1 = (enc.w1 * 8).round() / 8
    with torch.no_grad():
        enc.w1.copy_(w1)
    sp = SparseSpikeSEG.from_encoder(enc)
    ties = 0
    st = dst = None
    for t in range(60):
        f = _scene(t, 32, 48, rng, 0.02)
        out, st = sp.step(f, st)
        dout, new_dst = enc.step(enc.prepare_input(torch.from_numpy(f)), dst)
        _assert_same(sp, out, st, dout, cfg, enc, t)
        if dst is not None:  # the dense Conv2 membrane before threshold, this step
            i2 = torch.nn.functional.conv2d(dout.layer_spikes["pool1"], enc.w2, padding=2)
            ties += int(((dst.neurons[1].v + i2 - 0.625).clamp_min(0) == 5.0).sum())
        dst = new_dst
    assert ties > 0, "no membrane hit theta exactly; the tie case was not exercised"


@pytest.mark.parametrize("over", [{"leak": "multiplicative", "beta1": 0.9, "beta2": 0.8},
                                  {"fire_once": True}, {"lambda1": 0.09 * 90, "lambda2": 0.09}])
def test_leak_variants_and_fire_once(over: dict) -> None:
    rng = np.random.default_rng(3)
    cfg, enc, sp = _pair(over)
    frames = [_scene(t, 32, 40, rng) for t in range(40)] + [np.zeros((2, 32, 40), np.float32)] * 5
    frames += [_scene(t, 32, 40, rng) for t in range(10)]
    for t, (out, st, dout, _d) in enumerate(_run_both(cfg, enc, sp, frames)):
        _assert_same(sp, out, st, dout, cfg, enc, t)


@pytest.mark.parametrize("over", [{"lambda1": 1.6, "theta1": [10.0, 7.5, 12.0, 9.0]}, {"lambda1": 9.0}, {"lambda1": 0.3}])
def test_conv1_replay_after_gaps_of_every_length(over: dict) -> None:
    """Conv1's capped, branch-free leak replay (inexact lambda 1.6, per-channel theta) == dense, gaps 1..12 steps."""
    rng = np.random.default_rng(11)
    cfg, enc, sp = _pair(over)
    frames = []
    for gap in range(1, 13):
        frames += [_scene(t, 32, 40, rng, 0.03) for t in range(3)]
        frames += [np.zeros((2, 32, 40), np.float32)] * gap
    charged = 0  # membranes above the exact-closed-form limit (2 for lambda 1.6) decaying through a gap
    for t, (out, st, dout, dst) in enumerate(_run_both(cfg, enc, sp, frames)):
        _assert_same(sp, out, st, dout, cfg, enc, t)
        v1 = sp.membranes(st)[0]
        assert np.array_equal(v1, dst.neurons[0].v[0].numpy()), f"step {t}: Conv1 membranes differ"
        charged += int((v1 > 2.0).sum())
    assert charged > 100


def test_events_path_equals_frame_path_and_input_untouched() -> None:
    rng = np.random.default_rng(4)
    cfg = build(ModelConfig, {"input_mode": "count"})
    sp = SparseSpikeSEG.from_encoder(Encoder(cfg, 2))
    st_f = st_e = None
    for t in range(15):
        n = 400
        xs, ys, ps = rng.integers(0, 40, n), rng.integers(0, 32, n), rng.integers(0, 2, n)
        ev = make_events(np.arange(n), xs, ys, ps)
        f = np.zeros((2, 32, 40), np.float32)
        np.add.at(f, (ps, ys, xs), 1.0)
        f_copy = f.copy()
        o_f, st_f = sp.step(f, st_f)
        if st_e is None:
            st_e = sp.fresh_state(32, 40)
        o_e, st_e = sp.step(None, st_e, events=ev)
        assert np.array_equal(f, f_copy)
        assert np.array_equal(np.sort(o_f.s1), np.sort(o_e.s1)) and np.array_equal(o_f.s3, o_e.s3)
        assert np.array_equal(o_f.mask, o_e.mask)
    assert sum(len(v) for v in (o_f.s1,)) >= 0 and st_f.t == 15


def test_exact_leak_limit_and_closed_form() -> None:
    assert exact_leak_limit(1.0) == 2.0**24 and exact_leak_limit(9.0) == 2.0**24
    assert exact_leak_limit(0.625) == 2.0**21
    assert exact_leak_limit(0.0) == 0.0
    lam = np.float32(0.625)
    rng = np.random.default_rng(5)
    vs = rng.uniform(0, 20, 2000).astype(np.float32)
    for v in vs:
        k = int(rng.integers(1, 40))
        it = v
        for _ in range(k):
            it = max(np.float32(it - lam), np.float32(0))
        closed = np.float32(max(float(v) - k * float(lam), 0.0))
        assert it == closed


def test_bad_input_and_params_are_loud() -> None:
    cfg = build(ModelConfig, {})
    sp = SparseSpikeSEG.from_encoder(Encoder(cfg, 2))
    with pytest.raises(ValueError, match="expected"):
        sp.step(np.zeros((3, 8, 8), np.float32), None)
    with pytest.raises(ValueError, match="batch 1"):
        sp.step(np.zeros((2, 2, 8, 8), np.float32), None)
    with pytest.raises(ValueError, match="events"):
        sp.step(None, None)
    with pytest.raises(ValueError, match="too small"):
        sp.fresh_state(2, 8)
    p = params_from_config(cfg)
    with pytest.raises(ValueError, match="w2 shape"):
        SparseSpikeSEG(np.zeros((4, 2, 5, 5)), np.zeros((36, 4, 3, 3)), np.zeros((1, 36, 7, 7)), p)
    # the gated decoder's integer tables need W2, W3 on the 2^-12 grid in [0, 1]; ungated takes any
    w2, w3 = np.full((36, 4, 5, 5), 0.5), np.full((1, 36, 7, 7), 0.5)
    for bad2, bad3 in ((w2 + 1e-5, w3), (w2, w3 * 3.0)):
        with pytest.raises(ValueError, match="off the 2.-12 grid or outside .0, 1.*quantize_weights"):
            SparseSpikeSEG(np.zeros((4, 2, 5, 5)), bad2, bad3, p)
    SparseSpikeSEG(np.zeros((4, 2, 5, 5)), w2 + 1e-5, w3, params_from_config(build(ModelConfig, {"decoder_gate": False})))
    _o, st = sp.step(np.zeros((2, 16, 16), np.float32), None)
    with pytest.raises(ValueError, match="differs"):
        sp.step(np.zeros((2, 16, 20), np.float32), st)


@pytest.mark.parametrize("banks", [2, 3])
def test_banks_keep_a_step_decodable_while_the_next_ones_run(banks: int) -> None:
    """With ``banks`` banks, step t's supports (``at=ref``) are the same after steps t + 1 ..
    t + banks - 1 ran as right after step t (the overlap pipeline's jobs in flight)."""
    cfg, enc, sp = _pair({"conv1_gain": 40.0})
    rng = np.random.default_rng(3)
    frames = [_scene(t, 48, 64, rng, noise=0.0) for t in range(12)]
    one, many = None, sp.fresh_state(48, 64, banks=banks)
    checked = 0
    prev: list[tuple] = []
    for f in frames:
        out1, one = sp.step(f, one, decode=False)
        _out, many = sp.step(f, many, decode=False)
        assert len(many.banks) == banks and len(one.banks) == 1
        if len(prev) == banks - 1:  # the oldest kept step, decoded after banks - 1 more ran
            ref, spikes, expect = prev.pop(0)
            got = sp.spike_supports(many, spikes, sp.decode_scratch(many), at=ref)
            assert all(np.array_equal(a, b) for a, b in zip(got, expect))
            checked += len(spikes) > 0
        spikes = out1.s3[:8]
        expect = sp.spike_supports(one, spikes)  # single bank: right after its step
        assert all(np.array_equal(a, b) for a, b in zip(sp.spike_supports(many, spikes), expect))
        prev.append((many.ref, spikes, expect))
    assert checked >= 5
    with pytest.raises(ValueError, match="banks=5 is not allowed"):
        sp.fresh_state(48, 64, banks=5)
    with pytest.raises(ValueError, match="no step to decode yet"):
        sp.spike_supports(sp.fresh_state(48, 64), np.zeros(1, np.int64))


@pytest.mark.parametrize("over", [{}, {"fire_once": True, "leak": "multiplicative"}])
def test_reset_state_in_place_equals_a_fresh_state(over: dict) -> None:
    """A used state refilled by ``reset_state`` (its arrays kept) runs on exactly like a new
    one: spikes, pooled entries, masks and supports, step after step, with both banks.  Before
    the reset noise reaches every neuron up to step 29; after it the input is blank until
    step 29, so every mark left from before meets its own step count again, at other
    positions and in another touch order (other slots)."""
    cfg, enc, sp = _pair({"conv1_gain": 40.0, **over})
    rng = np.random.default_rng(5)
    before = [_scene(t, 48, 64, rng, noise=0.05) for t in range(30)]
    frames = [np.zeros((2, 48, 64), np.float32)] * 29 + [_scene(t, 48, 64, rng, noise=0.01) for t in range(12)]
    used = sp.fresh_state(48, 64, banks=2)
    for f in before:
        _out, used = sp.step(f, used)
        sp.spike_supports(used, _out.s3[:8])
    stamp = used.stamp
    assert sp.reset_state(used) is used and used.t == 0 and used.ref is None and used.stamp == stamp
    new = sp.fresh_state(48, 64, banks=2)
    fired = 0
    for t, f in enumerate(frames):
        a, used = sp.step(f, used)
        b, new = sp.step(f, new)
        for name in ("s1", "s2", "s3", "p1", "p2", "mask", "lit"):
            x, y = getattr(a, name), getattr(b, name)
            if name == "lit":
                x, y = np.sort(x), np.sort(y)
            assert np.array_equal(x, y), f"step {t}: {name} differs after reset_state"
        assert a.layer_spikes == b.layer_spikes
        spikes = a.s3[:8]
        assert all(np.array_equal(x, y) for x, y in zip(sp.spike_supports(used, spikes), sp.spike_supports(new, spikes)))
        fired += len(a.s3) > 0
    assert fired >= 3
    for x, y in zip(sp.membranes(used), sp.membranes(new)):
        assert np.array_equal(x, y)


def test_supports_with_too_few_block_slots_equal_and_grow() -> None:
    """Per-spike supports gather from per-cell W2 blocks; cells beyond the scratch's slots are
    gathered entry by entry. Same supports either way, and the next call has room for all."""
    cfg, enc, sp = _pair({"conv1_gain": 40.0})
    rng = np.random.default_rng(5)
    st = None
    checked = 0
    for t in range(10):
        out, st = sp.step(_scene(t, 48, 64, rng, noise=0.0), st, decode=False)
        if len(out.s3) < 4:
            continue
        expect = sp.spike_supports(st, out.s3)
        small = sp.decode_scratch(st)
        small["blk"] = np.empty(2 * BLOCK_SLOT, np.int16)  # two cells' blocks
        small["nsl"] = np.zeros(2, np.int64)
        got = sp.spike_supports(st, out.s3, small)
        assert all(np.array_equal(a, b) for a, b in zip(got, expect))
        assert small["nsl"][0] == 2 and small["nsl"][1] > 0  # both ways were taken
        again = sp.spike_supports(st, out.s3, small)  # grown: every cell has a slot now
        assert all(np.array_equal(a, b) for a, b in zip(again, expect))
        assert small["nsl"][1] == 0 and len(small["blk"]) > 2 * BLOCK_SLOT
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("every", [1, 2])
def test_supports_use_the_joint_mask_s_w2_blocks_once_it_is_complete(every: int, monkeypatch) -> None:
    """The joint mask lays the W2 blocks of every ``every``-th P1 position out in the step's
    bank; per-spike supports read them only after its pass is complete (before, e.g. on
    another thread while it runs, they build their own) and build the rest, and all give the
    same supports."""
    import model.sparse as msp

    monkeypatch.setattr(msp, "MASK_BLOCKS_EVERY", every)
    cfg, enc, sp = _pair({"conv1_gain": 40.0})
    rng = np.random.default_rng(11)
    st = None
    used = 0
    for t in range(10):
        out, st = sp.step(_scene(t, 48, 64, rng, noise=0.02), st, decode=False)
        if not len(out.s3):
            continue
        spikes = out.s3[:16]
        own = sp.spike_supports(st, spikes)  # mask not decoded yet: own blocks
        built = int(st.scratch["nsl"][0])
        assert built > 0 and st.ref.bank["bready"][0] != st.ref.t
        out = sp.decode_mask(out, st)
        assert st.ref.bank["bready"][0] == st.ref.t
        shared = sp.spike_supports(st, spikes)
        if st.scratch["nbs"][1] == 0:  # the bank had room for the mask's share of the blocks
            rebuilt = int(st.scratch["nsl"][0])
            assert rebuilt == 0 if every == 1 else 0 < rebuilt < built
            used += 1
        assert all(np.array_equal(a, b) for a, b in zip(own, shared)), f"step {t}"
    assert used >= 3
