"""Peer networks: SpikeSEG with the same weights and maths, built the way others build it.

Every peer maps a list of (C, H, W) count frames to, per step, the windowed mask (H, W)
uint8 and the spike counts of conv1/conv2/conv3, with exactly the network of
``model/encoder.py`` + ``model/decoder.py`` (IGARSS 2023 defaults)::

    x  = [frame > 0]                                     (input_mode: binary)
    S1 = LIF(conv2d(x, W1, pad 2); lambda1, theta1)      V <- max(V + I - lambda, 0); S = V >= theta; V <- 0 where S
    P1, idx1 = maxpool2(S1)
    S2 = LIF(conv2d(P1, W2, pad 2); lambda2, theta2)
    P2, idx2 = maxpool2(S2)
    S3 = IF(conv2d(P2, W3, pad 3); theta3)               V <- V + I
    D  = convT(S3, W3) -> unpool(idx2) * S2 -> convT(W2) -> unpool(idx1) * S1 -> convT(W1) -> sum_c
    raw = [D > decoder_threshold];  mask = union of the last ``mask_window`` raw masks

The peers decode every step, as the research code does (our node skips the decoder when
Conv3 is silent; that shortcut is part of what is being compared).

* :class:`DensePeer`: plain per-step PyTorch, NCHW (the research code's way).
* :class:`SpikingJellyPeer`: spikingjelly ``layer.Conv2d`` and neurons in multi-step mode
  over windows of ``T`` steps; the subtractive-leak LIF is a ``SimpleBaseNode`` whose
  charge is exactly ``V <- max(V + I - lambda, 0)``; Conv3 is spikingjelly's ``IFNode``;
  hard reset to 0 and a Heaviside that fires on ``>=`` (exact maths).
* :class:`SnnTorchPeer`: snnTorch ``Leaky`` per step.  ``Leaky`` cannot express a constant
  leak with a floor, so the closest: ``beta = 1``, input ``I - lambda``, reset to zero
  without delay, then ``mem <- max(mem, 0)`` outside the neuron.  That is exact because
  theta > 0: ``max(u, 0) >= theta`` iff ``u >= theta``, so flooring after the spike
  decision changes nothing.  snnTorch fires on ``mem > threshold``, so the threshold
  is the float32 just below theta (exact; PERF-NOTES' ``theta - 1/512`` flipped spikes
  here), and it adds ``mem + (I - lambda)`` where we add ``(V + I) - lambda``: that can
  differ in the last bit, which the equality check before timing reveals.

Only ``n_classes == 1``, scalar thresholds, subtractive leak, no fire-once and the
``union`` window are implemented (the defaults); other configs raise ValueError.
"""
from __future__ import annotations

import collections
import math
import importlib.util
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PeerParams(NamedTuple):
    """Weights and constants shared by every peer (taken from an opened model node)."""

    w1: Tensor
    w2: Tensor
    w3: Tensor
    theta: tuple[float, float, float]
    lam: tuple[float, float]
    gate: bool
    threshold: float
    window: int


class PeerStep(NamedTuple):
    """One step of a peer: windowed mask (H, W) uint8 and spike counts (conv1, conv2, conv3)."""

    mask: Tensor
    counts: tuple[int, int, int]


def params_from_encoder(encoder: Any) -> PeerParams:
    """:class:`PeerParams` from an opened ``model.encoder.Encoder`` (its config and loaded weights)."""
    mc = encoder.cfg
    problems = []
    if mc.n_classes != 1:
        problems.append(f"n_classes={mc.n_classes}")
    if mc.leak != "subtractive":
        problems.append(f"leak={mc.leak}")
    if mc.fire_once:
        problems.append("fire_once")
    if mc.input_mode != "binary":
        problems.append(f"input_mode={mc.input_mode}")
    if mc.mask_window_mode != "union":
        problems.append(f"mask_window_mode={mc.mask_window_mode}")
    thetas = []
    for t in (encoder.theta1, encoder.theta2, encoder.theta3):
        flat = t.flatten()
        if not bool((flat == flat[0]).all()):
            problems.append("per-channel thresholds")
        thetas.append(float(flat[0]))
    if problems:
        raise ValueError(f"peers implement the default network only; this config has {', '.join(problems)}")
    return PeerParams(
        w1=encoder.w1.detach().clone(), w2=encoder.w2.detach().clone(), w3=encoder.w3.detach().clone(),
        theta=(thetas[0], thetas[1], thetas[2]), lam=(float(mc.lambda1), float(mc.lambda2)),
        gate=bool(mc.decoder_gate), threshold=float(mc.decoder_threshold), window=int(mc.mask_window),
    )


def _decode(s3: Tensor, s2: Tensor, s1: Tensor, idx2: Tensor, idx1: Tensor, p: PeerParams) -> Tensor:
    """Tied decoder for a batch (N, 1, h, w) of S3 -> raw masks (N, H, W) bool."""
    d = F.conv_transpose2d(s3, p.w3, padding=3)
    d = F.max_unpool2d(d, idx2, 2, stride=2, output_size=s2.shape[-2:])
    if p.gate:
        d = d * s2
    d = F.conv_transpose2d(d, p.w2, padding=2)
    d = F.max_unpool2d(d, idx1, 2, stride=2, output_size=s1.shape[-2:])
    if p.gate:
        d = d * s1
    d = F.conv_transpose2d(d, p.w1, padding=2)
    return d.sum(dim=1) > p.threshold


class _Window:
    """Union of the last ``n`` raw masks, newest wins (one class: any lit pixel is 1)."""

    def __init__(self, n: int) -> None:
        self.recent: collections.deque[Tensor] = collections.deque(maxlen=n)

    def __call__(self, raw: Tensor) -> Tensor:
        self.recent.append(raw)
        out = self.recent[0]
        for m in list(self.recent)[1:]:
            out = out | m
        return out.to(torch.uint8)


class DensePeer:
    """Plain per-step PyTorch, NCHW, fresh tensors every step: the research code's way."""

    name = "dense per-step PyTorch"

    def __init__(self, p: PeerParams) -> None:
        self.p = p
        self.reset()

    def reset(self) -> None:
        self.v: list[Tensor | None] = [None, None, None]
        self.window = _Window(self.p.window)

    def _lif(self, k: int, i: Tensor) -> Tensor:
        v = self.v[k] if self.v[k] is not None else torch.zeros_like(i)
        v = v + i
        if k < 2:
            v = torch.clamp(v - self.p.lam[k], min=0.0)
        s = (v >= self.p.theta[k]).float()
        self.v[k] = v * (1.0 - s)
        return s

    def run(self, frames: list[Tensor]) -> list[PeerStep]:
        out = []
        p = self.p
        with torch.inference_mode():
            for f in frames:
                x = (f > 0).float().unsqueeze(0)
                s1 = self._lif(0, F.conv2d(x, p.w1, padding=2))
                p1, idx1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
                s2 = self._lif(1, F.conv2d(p1, p.w2, padding=2))
                p2, idx2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
                s3 = self._lif(2, F.conv2d(p2, p.w3, padding=3))
                raw = _decode(s3, s2, s1, idx2, idx1, p)[0]
                counts = (int(s1.sum()), int(s2.sum()), int(s3.sum()))
                out.append(PeerStep(self.window(raw), counts))
        return out


def spikingjelly_available() -> bool:
    return importlib.util.find_spec("spikingjelly") is not None


def snntorch_available() -> bool:
    return importlib.util.find_spec("snntorch") is not None


class SpikingJellyPeer:
    """spikingjelly layers in multi-step mode over windows of ``T`` steps (exact maths)."""

    name = "spikingjelly multi-step"

    def __init__(self, p: PeerParams, T: int = 10) -> None:
        # Imported here: spikingjelly is optional (installed by `make bench`, not `make test`).
        from spikingjelly.activation_based import functional, layer, neuron, surrogate

        class SubtractiveLIF(neuron.SimpleBaseNode):
            """``V <- max(V + I - lambda, 0)``; fire at ``V >= theta``; hard reset to 0."""

            def __init__(self, lam: float, v_threshold: float) -> None:
                super().__init__(v_threshold=v_threshold, v_reset=0.0, surrogate_function=surrogate.Sigmoid(),
                                 detach_reset=True, step_mode="m")
                self.lam = lam

            def neuronal_charge(self, x: Tensor) -> None:
                self.v = torch.clamp(self.v + x - self.lam, min=0.0)

        self.p = p
        self.T = T
        self._functional = functional
        c_in = p.w1.shape[1]
        self.conv1 = layer.Conv2d(c_in, 4, 5, padding=2, bias=False, step_mode="m")
        self.conv2 = layer.Conv2d(4, 36, 5, padding=2, bias=False, step_mode="m")
        self.conv3 = layer.Conv2d(36, p.w3.shape[0], 7, padding=3, bias=False, step_mode="m")
        with torch.no_grad():
            self.conv1.weight.copy_(p.w1)
            self.conv2.weight.copy_(p.w2)
            self.conv3.weight.copy_(p.w3)
        self.lif1 = SubtractiveLIF(p.lam[0], p.theta[0])
        self.lif2 = SubtractiveLIF(p.lam[1], p.theta[1])
        self.if3 = neuron.IFNode(v_threshold=p.theta[2], v_reset=0.0, detach_reset=True, step_mode="m")
        self.net = torch.nn.ModuleList([self.conv1, self.lif1, self.conv2, self.lif2, self.conv3, self.if3])
        self.reset()

    def reset(self) -> None:
        self._functional.reset_net(self.net)
        self.window = _Window(self.p.window)

    @staticmethod
    def _pool(s: Tensor) -> tuple[Tensor, Tensor]:
        t, b = s.shape[:2]
        y, idx = F.max_pool2d(s.flatten(0, 1), 2, stride=2, return_indices=True)
        return y.unflatten(0, (t, b)), idx

    def run(self, frames: list[Tensor]) -> list[PeerStep]:
        out: list[PeerStep] = []
        with torch.inference_mode():
            for a in range(0, len(frames), self.T):
                x = (torch.stack(frames[a:a + self.T]) > 0).float().unsqueeze(1)  # (T, 1, C, H, W)
                s1 = self.lif1(self.conv1(x))
                p1, idx1 = self._pool(s1)
                s2 = self.lif2(self.conv2(p1))
                p2, idx2 = self._pool(s2)
                s3 = self.if3(self.conv3(p2))
                raw = _decode(s3.flatten(0, 1), s2.flatten(0, 1), s1.flatten(0, 1), idx2, idx1, self.p)
                c1 = s1.sum(dim=(1, 2, 3, 4)).tolist()
                c2 = s2.sum(dim=(1, 2, 3, 4)).tolist()
                c3 = s3.sum(dim=(1, 2, 3, 4)).tolist()
                for k in range(x.shape[0]):
                    out.append(PeerStep(self.window(raw[k]), (int(c1[k]), int(c2[k]), int(c3[k]))))
        return out


class SnnTorchPeer:
    """snnTorch ``Leaky`` neurons per step (closest expression of the maths; see module doc)."""

    name = "snnTorch Leaky"

    def __init__(self, p: PeerParams) -> None:
        import snntorch as snn  # optional peer, installed by `make bench`

        self.p = p
        # snnTorch fires on mem > threshold, ours on V >= theta.  PERF-NOTES used theta - 1/512;
        # the float32 just below theta is exact instead: no float32 lies between the two, so
        # mem > below(theta) iff mem >= theta.  (theta - 1/512 flipped spikes on scene input.)
        def below(t: float) -> float:
            return float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(-math.inf)))

        self.neurons = [
            snn.Leaky(beta=1.0, threshold=below(p.theta[k]), reset_mechanism="zero", reset_delay=False)
            for k in range(3)
        ]
        self.reset()

    def reset(self) -> None:
        self.mem: list[Tensor | None] = [None, None, None]
        self.window = _Window(self.p.window)

    def _lif(self, k: int, i: Tensor) -> Tensor:
        if self.mem[k] is None:
            self.mem[k] = torch.zeros_like(i)
        if k < 2:
            spk, mem = self.neurons[k](i - self.p.lam[k], self.mem[k])
            mem = torch.clamp(mem, min=0.0)  # the floor snnTorch cannot express
        else:
            spk, mem = self.neurons[k](i, self.mem[k])
        self.mem[k] = mem
        return spk

    def run(self, frames: list[Tensor]) -> list[PeerStep]:
        out = []
        p = self.p
        with torch.inference_mode():
            for f in frames:
                x = (f > 0).float().unsqueeze(0)
                s1 = self._lif(0, F.conv2d(x, p.w1, padding=2))
                p1, idx1 = F.max_pool2d(s1, 2, stride=2, return_indices=True)
                s2 = self._lif(1, F.conv2d(p1, p.w2, padding=2))
                p2, idx2 = F.max_pool2d(s2, 2, stride=2, return_indices=True)
                s3 = self._lif(2, F.conv2d(p2, p.w3, padding=3))
                raw = _decode(s3, s2, s1, idx2, idx1, p)[0]
                counts = (int(s1.sum()), int(s2.sum()), int(s3.sum()))
                out.append(PeerStep(self.window(raw), counts))
        return out


def build_peers(p: PeerParams) -> tuple[list[Any], dict[str, str]]:
    """Every peer that can be built here, and {name: why not} for the others."""
    peers: list[Any] = [DensePeer(p)]
    missing: dict[str, str] = {}
    if spikingjelly_available():
        peers.append(SpikingJellyPeer(p))
    else:
        missing[SpikingJellyPeer.name] = "spikingjelly not installed (make bench installs it)"
    if snntorch_available():
        peers.append(SnnTorchPeer(p))
    else:
        missing[SnnTorchPeer.name] = "snntorch not installed (make bench installs it)"
    return peers, missing


def compare(peer_out: list[PeerStep], masks: list[Any], counts: list[dict[str, int]]) -> dict[str, int]:
    """Differences between a peer and our node: steps whose spike counts differ, mask pixels that differ."""
    import numpy as np

    bad_counts = 0
    bad_pixels = 0
    for po, m, c in zip(peer_out, masks, counts):
        if po.counts != (c["conv1"], c["conv2"], c["conv3"]):
            bad_counts += 1
        bad_pixels += int(np.count_nonzero(po.mask.numpy() != m))
    return {"steps_with_count_mismatch": bad_counts, "mask_pixels_differing": bad_pixels, "steps": len(peer_out)}
