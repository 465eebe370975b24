"""Tied decoder: one class spike decodes to exactly its receptive field; gate; classes; mask window."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.decoder import decode_mask, decode_saliency, saliency_to_mask, window_step
from model.encoder import Encoder, EncoderOutput
from stream.config import build





def _random_output(h: int, w: int, n_classes: int = 1, seed: int = 0, density: float = 0.05) -> EncoderOutput:
    """An encoder output with random spikes in every layer and the pooling indices they produce."""
    g = torch.Generator().manual_seed(seed)
    s1 = (torch.rand(1, 4, h, w, generator=g) < density).float()
    p1, i1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
    s2 = (torch.rand(1, 36, h // 2, w // 2, generator=g) < density).float()
    p2, i2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
    s3 = torch.zeros(1, n_classes, h // 4, w // 4)
    return EncoderOutput(
        classification_spikes=s3,
        pooling_indices=(i1, i2),
        pooling_output_sizes=((h, w), (h // 2, w // 2)),
        layer_spikes={"conv1": s1, "pool1": p1, "conv2": s2, "pool2": p2, "conv3": s3},
        first_spike_times={},
        has_spikes=s3.sum() > 0,
        n_classification_spikes=s3.sum(),
    )


def _receptive_field(out: EncoderOutput, i: int, j: int, gate: bool) -> set[tuple[int, int]]:
    """Hand computation with sets: Conv3 neuron (i, j) -> 7x7 pool2 cells -> routed S2 cells -> 5x5
    pool1 cells -> routed S1 cells -> 5x5 input pixels (positive weights everywhere, so reach = support)."""
    (h, w), (h2, w2) = out.pooling_output_sizes
    hp1, wp1, hp2, wp2 = h // 2, w // 2, h2 // 2, w2 // 2
    i1, i2 = out.pooling_indices
    s1, s2 = out.layer_spikes["conv1"][0], out.layer_spikes["conv2"][0]

    def around(cells: set[tuple[int, int]], r: int, hh: int, ww: int) -> set[tuple[int, int]]:
        return {(y, x) for cy, cx in cells for y in range(max(0, cy - r), min(hh, cy + r + 1))
                for x in range(max(0, cx - r), min(ww, cx + r + 1))}

    def route(cells: set[tuple[int, int]], idx: torch.Tensor, s: torch.Tensor, width: int) -> set[tuple[int, int]]:
        out_cells = set()
        for a, b in cells:
            for c in range(idx.shape[1]):
                y, x = divmod(int(idx[0, c, a, b]), width)
                if not gate or s[c, y, x] > 0:
                    out_cells.add((y, x))
        return out_cells

    p2_cells = around({(i, j)}, 3, hp2, wp2)
    s2_cells = route(p2_cells, i2, s2, w2)
    p1_cells = around(s2_cells, 2, hp1, wp1)
    s1_cells = route(p1_cells, i1, s1, w)
    return around(s1_cells, 2, h, w)


def _positive_weights(in_ch: int = 2, n_classes: int = 1):
    g = torch.Generator().manual_seed(1)
    w1 = torch.rand(4, in_ch, 5, 5, generator=g) + 0.1
    w2 = torch.rand(36, 4, 5, 5, generator=g) + 0.1
    w3 = torch.rand(n_classes, 36, 7, 7, generator=g) + 0.1
    return w1, w2, w3


def test_one_class_spike_maps_back_to_exactly_its_receptive_field() -> None:
    for gate in (False, True):
        out = _random_output(26, 31)
        out.classification_spikes[0, 0, 3, 4] = 1.0
        w1, w2, w3 = _positive_weights()
        mask = decode_mask(out, w1, w2, w3, gate=gate, threshold=0.0)[0]
        assert mask.shape == (26, 31) and mask.dtype == torch.uint8
        got = {(int(y), int(x)) for y, x in torch.nonzero(mask)}
        want = _receptive_field(out, 3, 4, gate)
        assert want and got == want, f"gate={gate}"
    # the gate shrinks the mask to the pixels that actually spiked
    assert len(_receptive_field(out, 3, 4, True)) < len(_receptive_field(out, 3, 4, False))


def test_decoder_is_the_adjoint_of_the_routed_encoder() -> None:
    # Independent check: saliency = d I3[k, i, j] / d x through conv -> fixed pool routing -> conv -> routing -> conv.
    out = _random_output(20, 24)
    out.classification_spikes[0, 0, 2, 3] = 1.0
    w1, w2, w3 = _positive_weights()
    i1, i2 = out.pooling_indices
    x = torch.zeros(1, 2, 20, 24, requires_grad=True)
    a = F.conv2d(x, w1, padding=2).flatten(2).gather(2, i1.flatten(2)).view_as(i1)
    b = F.conv2d(a, w2, padding=2).flatten(2).gather(2, i2.flatten(2)).view_as(i2)
    F.conv2d(b, w3, padding=3)[0, 0, 2, 3].backward()
    sal = decode_saliency(out, w1, w2, w3, gate=False)
    assert sal.dtype == torch.float64  # exact sums (quantize_weights docstring)
    assert torch.allclose(sal[0, 0].float(), x.grad[0].sum(0), rtol=1e-4, atol=1e-3)


def test_classes_are_decoded_separately_in_one_pass() -> None:
    out = _random_output(48, 56, n_classes=3, seed=2)
    s3 = out.classification_spikes
    s3[0, 0, 1, 1] = 1.0
    s3[0, 2, 9, 11] = 1.0
    w1, w2, w3 = _positive_weights(n_classes=3)
    sal = decode_saliency(out, w1, w2, w3, gate=True)
    assert sal.shape == (1, 3, 48, 56)
    for k in range(3):
        single = out._replace(classification_spikes=s3[:, k : k + 1])
        alone = decode_saliency(single, w1, w2, w3[k : k + 1], gate=True)
        assert torch.allclose(sal[:, k], alone[:, 0], atol=1e-3)
    mask = saliency_to_mask(sal, 0.0)[0]
    assert set(mask.unique().tolist()) == {0, 1, 3}  # class 2 never spiked


def test_no_class_spike_gives_empty_mask_and_threshold_applies() -> None:
    out = _random_output(16, 16)
    w1, w2, w3 = _positive_weights()
    assert int(decode_mask(out, w1, w2, w3, True, 0.0).sum()) == 0
    sal = torch.tensor([[[[0.5, 2.0]], [[1.0, 0.1]]]])  # (B=1, n=2, H=1, W=2)
    assert saliency_to_mask(sal, 0.0).tolist() == [[[2, 1]]]
    assert saliency_to_mask(sal, 1.0).tolist() == [[[0, 1]]]


def test_encoder_then_decoder_runs_at_odd_size_with_the_real_conv1() -> None:
    cfg = build(ModelConfig, {"conv1_gain": 60.0})
    enc = Encoder(cfg, 2)
    x = torch.zeros(1, 2, 27, 35)
    x[0, 1, 4:24, 10:12] = 1.0
    st = None
    for _ in range(3):
        out, st = enc.step(x, st)
    assert bool(out.has_spikes)
    mask = decode_mask(out, enc.w1, enc.w2, enc.w3, True, 0.0)[0]
    assert mask.shape == (27, 35) and 0 < int((mask > 0).sum()) < 27 * 35


def test_mask_window_union_and_decay() -> None:
    m = [torch.zeros(1, 4, dtype=torch.uint8) for _ in range(4)]
    m[0][0, 0] = 1
    m[1][0, 1] = 2
    m[2][0, 0] = 2
    outs, st = [], None
    for r in m:
        o, st = window_step(r, st, 3, "union", 0.5, 2)
        outs.append(o[0].tolist())
    # pixel 0: class 1 at t0, newest class 2 at t2, gone after its last lighting leaves the 3-step window
    assert outs == [[1, 0, 0, 0], [1, 2, 0, 0], [2, 2, 0, 0], [2, 2, 0, 0]]
    o, _ = window_step(m[1], None, 1, "union", 0.5, 2)
    assert torch.equal(o, m[1])
    # decay, n = 2, factor 0.5: kept while presence >= 0.5; lit twice in a row survives one more step
    seq = [torch.tensor([[1]], dtype=torch.uint8)] * 2 + [torch.tensor([[0]], dtype=torch.uint8)] * 3
    st, got = None, []
    for r in seq:
        o, st = window_step(r, st, 2, "decay", 0.5, 1)
        got.append(int(o))
    # presence: 1, 1.5, 0.75, 0.375, ... -> kept at steps 0..2
    assert got == [1, 1, 1, 0, 0]


def test_crop_decoder_equals_full_frame_decoder() -> None:
    """decode_mask_crops (sum of per-spike 40x40 crops) == decode_mask, bit for bit: weights on the
    2^-12 grid, several rows, two classes, gate on and off, odd size, many spikes."""
    from model.decoder import decode_mask_crops
    from model.encoder import quantize_weights

    for gate in (True, False):
        rows = [_random_output(37, 45, n_classes=2, seed=s, density=0.2) for s in range(3)]
        g = torch.Generator().manual_seed(5)
        for o in rows:
            o.classification_spikes.copy_((torch.rand(o.classification_spikes.shape, generator=g) < 0.3).float())
        out = rows[0]._replace(
            classification_spikes=torch.cat([o.classification_spikes for o in rows]),
            pooling_indices=tuple(torch.cat([o.pooling_indices[i] for o in rows]) for i in range(2)),
            layer_spikes={k: torch.cat([o.layer_spikes[k] for o in rows]) for k in rows[0].layer_spikes},
        )
        w1, w2, w3 = _positive_weights(n_classes=2)
        w1 = quantize_weights(w1 - 0.6, clip=False)  # signed, like the real Conv1
        w2, w3 = quantize_weights(w2 - 0.1), quantize_weights(w3 - 0.1)
        full = decode_mask(out, w1, w2, w3, gate, 0.0)
        crops = decode_mask_crops(out, w1, w2, w3, gate, 0.0, chunk=50)
        assert int(out.classification_spikes.sum()) > 100 and 0 < int((full > 0).sum()) < full.numel()
        assert torch.equal(full, crops)


def test_few_input_channel_transposed_conv_equals_conv_transpose2d() -> None:
    """The CPU form of the first decoder conv (classes -> 36, a forward conv with the flipped
    kernel) equals ``conv_transpose2d`` bit for bit: binary spikes, grid weights, odd sizes."""
    from model.decoder import _transposed_conv_few_in
    from model.encoder import quantize_weights

    g = torch.Generator().manual_seed(5)
    for n_cls, (h, w) in ((1, (9, 13)), (3, (16, 11))):
        x = (torch.rand(2, n_cls, h, w, generator=g) < 0.2).double()
        wt = quantize_weights(torch.rand(n_cls, 36, 7, 7, generator=g)).double()
        got = _transposed_conv_few_in(x, wt, 3)
        assert got.shape == (2, 36, h, w) and torch.equal(got, F.conv_transpose2d(x, wt, padding=3))
