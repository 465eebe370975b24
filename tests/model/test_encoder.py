"""Encoder: shapes at odd and real resolutions, pooling round-trip, state carry, reset, batching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.conv1 import conv1_weights
from model.encoder import Encoder, init_learned_weights
from stream.config import build





def _cfg(**kw) -> ModelConfig:
    return build(ModelConfig, kw)


def _bar_frames(n: int, h: int, w: int, c: int = 2) -> torch.Tensor:
    """A vertical bar 2 px wide moving right 1 px per step (ON at the leading edge, OFF at the trailing)."""
    out = torch.zeros(n, c, h, w)
    for t in range(n):
        x = (3 + t) % w
        out[t, c - 1, 2 : h - 2, x] = 1.0
        out[t, 0, 2 : h - 2, (x - 2) % w] = 1.0
    return out


@pytest.mark.parametrize("hw", [(27, 35), (34, 34), (260, 346), (4, 4), (5, 7)])
def test_shapes_at_several_resolutions(hw: tuple[int, int]) -> None:
    h, w = hw
    enc = Encoder(_cfg(), 2)
    out, st = enc.step(torch.zeros(1, 2, h, w), None)
    s1, s2, s3 = (out.layer_spikes[k] for k in ("conv1", "conv2", "conv3"))
    assert s1.shape == (1, 4, h, w)
    assert s2.shape == (1, 36, h // 2, w // 2)
    assert s3.shape == (1, 1, (h // 2) // 2, (w // 2) // 2)
    assert out.pooling_output_sizes == ((h, w), (h // 2, w // 2))
    assert out.pooling_indices[0].shape == (1, 4, h // 2, w // 2)
    assert out.has_spikes.dtype == torch.bool and out.has_spikes.dim() == 0
    assert st.t == 1 and st.neurons[0].v.shape == s1.shape


def test_too_small_input_is_refused() -> None:
    with pytest.raises(ValueError, match="H, W >= 4"):
        Encoder(_cfg(), 1).step(torch.zeros(1, 1, 3, 8), None)


def test_pool_indices_round_trip_through_unpooling_at_odd_size() -> None:
    torch.manual_seed(0)
    s1 = (torch.rand(1, 4, 27, 35) < 0.3).float()
    p1, idx = F.max_pool2d(s1, 2, stride=2, return_indices=True)
    up = F.max_unpool2d(p1, idx, 2, stride=2, output_size=s1.shape[-2:])
    assert up.shape == s1.shape
    assert torch.equal(F.max_pool2d(up, 2, stride=2), p1)  # re-pooling gives back the pooled map
    assert torch.equal(up * s1, up)  # every unpooled spike sits on a real spike
    # and the encoder's own indices behave the same
    enc = Encoder(_cfg(conv1_gain=60.0), 2)
    st = None
    for f in _bar_frames(4, 27, 35):
        out, st = enc.step(f[None], st)
    s1 = out.layer_spikes["conv1"]
    assert s1.sum() > 0
    up = F.max_unpool2d(out.layer_spikes["pool1"], out.pooling_indices[0], 2, stride=2, output_size=out.pooling_output_sizes[0])
    assert torch.equal(up * s1, up) and torch.equal(F.max_pool2d(up, 2, stride=2), out.layer_spikes["pool1"])


def test_weights_paper_init_and_fixed_conv1() -> None:
    w2, w3 = init_learned_weights(3, seed=42)
    assert w2.shape == (36, 4, 5, 5) and w3.shape == (3, 36, 7, 7)
    assert 0.0 <= float(w2.min()) and float(w2.max()) <= 1.0
    assert abs(float(w2.mean()) - 0.8) < 0.005 and abs(float(w2.std()) - 0.01) < 0.003
    a, b = init_learned_weights(3, seed=42), init_learned_weights(3, seed=43)
    assert torch.equal(a[0], w2) and not torch.equal(b[0], w2)
    enc = Encoder(_cfg(n_classes=3), 2)
    assert not enc.w2.requires_grad and not enc.w3.requires_grad
    assert [n for n, _ in enc.named_buffers()] == ["w1", "theta1", "theta2", "theta3"]
    for kind in ("gabor", "dog", "dog_gabor"):
        for c in (1, 2):
            w1 = conv1_weights(kind, c, 24.0)
            assert w1.shape == (4, c, 5, 5)
            for o in range(4):  # each feature: zero mean, positive lobe sums to the gain
                k = w1[o]
                assert abs(float(k.sum())) < 1e-3 * 24 * c
                assert float(k.clamp_min(0).sum()) == pytest.approx(24.0 * (c if kind != "dog" else 1), rel=1e-5)


def test_state_persists_across_steps_and_reset_drops_it() -> None:
    # theta 10, lambda 9: a neuron receiving I = 14 per step reaches 5, 10 -> fires on step 2, never on step 1.
    cfg = _cfg(conv1_gain=14.0, lambda1=9.0)
    enc = Encoder(cfg, 1)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 2:7, 4] = 1.0  # a 5-px vertical line: the 0-degree Gabor's positive lobe, I = gain at (4, 4)
    out1, st = enc.step(x, None)
    assert out1.layer_spikes["conv1"][0, 0, 4, 4] == 0
    assert float(st.neurons[0].v[0, 0, 4, 4]) == pytest.approx(5.0, abs=1e-4)
    out2, st = enc.step(x, st)
    assert out2.layer_spikes["conv1"][0, 0, 4, 4] == 1
    assert int(out2.first_spike_times["conv1"][0, 0, 4, 4]) == 1
    assert int(out1.first_spike_times["conv1"][0, 0, 4, 4]) == -1
    # reset = fresh state: the first step after it does not fire again
    out3, _ = enc.step(x, None)
    assert out3.layer_spikes["conv1"][0, 0, 4, 4] == 0


def test_per_channel_thresholds_apply_per_channel() -> None:
    enc = Encoder(_cfg(conv1_gain=30.0, theta1=(10.0, 1000.0, 1000.0, 1000.0)), 1)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 2:7, 4] = 1.0
    out, _ = enc.step(x, None)
    s1 = out.layer_spikes["conv1"]
    assert s1[0, 0].sum() > 0 and s1[0, 1:].sum() == 0


def test_batch_of_streams_equals_separate_runs_and_inputs_not_mutated() -> None:
    cfg = _cfg(conv1_gain=40.0)
    enc = Encoder(cfg, 2)
    a, b = _bar_frames(6, 20, 24), _bar_frames(6, 20, 24).flip(-1)
    sa = sb = sab = None
    for t in range(6):
        xa, xb = a[t : t + 1].clone(), b[t : t + 1].clone()
        oa, sa = enc.step(xa, sa)
        ob, sb = enc.step(xb, sb)
        oab, sab = enc.step(torch.cat([xa, xb]), sab)
        for k in ("conv1", "conv2", "conv3"):
            assert torch.equal(oab.layer_spikes[k], torch.cat([oa.layer_spikes[k], ob.layer_spikes[k]]))
        assert torch.equal(xa, a[t : t + 1])
    assert int(sa.first_spike[0].ge(0).sum()) > 0  # the comparison above saw real spikes


def test_fire_once_mode_limits_each_neuron_to_one_spike() -> None:
    enc = Encoder(_cfg(conv1_gain=40.0, fire_once=True, leak="multiplicative", beta1=1.0, beta2=1.0), 2)
    st = None
    total = torch.zeros(1, 4, 20, 24)
    for f in _bar_frames(10, 20, 24):
        out, st = enc.step(f[None], st)
        total += out.layer_spikes["conv1"]
    assert total.max() == 1 and total.sum() > 0
    assert torch.equal(st.neurons[0].fired, total.bool())
