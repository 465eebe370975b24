"""Fixed Conv1 kernels: W1[4, C_in, 5, 5] built from DoG and/or Gabor filters.

Every kernel is made zero-mean over its 5x5 support and then scaled so that its positive
entries sum to 1, then multiplied by ``gain``::

    K      = k - mean(k)
    W1     = gain * K / sum(max(K, 0))

so ``gain`` is exactly the current a neuron receives when every pixel of the kernel's
positive lobe holds one event (binary input).  That is the calibration knob the papers
leave free (they filtered grey-level images, we filter event counts); thresholds stay
paper-exact.  Zero mean makes uniform activity (flicker, noise floors) cancel.

Kinds (``conv1`` in the model config):

* ``"gabor"`` (default): 4 even Gabor filters at 0, 45, 90, 135 degrees (sigma 1.5,
  wavelength 4, aspect 0.5), the same kernel on every input polarity channel, so an edge
  counts whatever its polarity.  SpikeSEG's 4 Conv1 features are orientation features and
  moving edges are what event cameras see, hence the default.
* ``"dog"``: Difference of Gaussians, sigma1 = 1, sigma2 = 2 (each Gaussian normalised to
  unit sum over the 5x5 support).  With C_in = 2: channels (ON-centre on OFF events,
  ON-centre on ON events, OFF-centre on OFF events, OFF-centre on ON events): polarity is
  kept separate.  With C_in = 1: ON-/OFF-centre at sigma (1, 2) and at sigma (0.5, 1).
* ``"dog_gabor"``: the Kheradpisheh 2018 pipeline (DoG on the image, then Gabor) folded
  into one kernel: each Gabor convolved with the sigma (1, 2) DoG and cropped to 5x5.

Alternative not taken: learning Conv1 (the papers fix it; STDP on 25-pixel kernels over
sparse events learns noise).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Conv1Kind = Literal["dog", "gabor", "dog_gabor"]
KSIZE = 5
N_FEATURES = 4
ORIENTATIONS_DEG = (0.0, 45.0, 90.0, 135.0)


def _grid(size: int = KSIZE) -> tuple[Tensor, Tensor]:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return yy, xx


def gaussian(sigma: float, size: int = KSIZE) -> Tensor:
    """Isotropic Gaussian normalised to unit sum over the ``size`` x ``size`` support (float64)."""
    yy, xx = _grid(size)
    g = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return g / g.sum()


def dog(sigma1: float = 1.0, sigma2: float = 2.0, size: int = KSIZE) -> Tensor:
    """ON-centre Difference of Gaussians ``G(sigma1) - G(sigma2)`` (sums to 0)."""
    return gaussian(sigma1, size) - gaussian(sigma2, size)


def gabor(theta_deg: float, sigma: float = 1.5, wavelength: float = 4.0, gamma: float = 0.5, size: int = KSIZE) -> Tensor:
    """Even (cosine) Gabor: ``exp(-(x'^2 + gamma^2 y'^2) / 2 sigma^2) * cos(2 pi x' / wavelength)``.

    ``x' = x cos t + y sin t``, ``y' = -x sin t + y cos t``; ``theta_deg`` is the direction of the
    modulation, so the positive centre line runs perpendicular to it.
    """
    yy, xx = _grid(size)
    t = math.radians(theta_deg)
    xr = xx * math.cos(t) + yy * math.sin(t)
    yr = -xx * math.sin(t) + yy * math.cos(t)
    return torch.exp(-(xr**2 + gamma**2 * yr**2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / wavelength)


def _normalise(k: Tensor) -> Tensor:
    """Zero mean over the support, positive part summing to 1."""
    k = k - k.mean()
    return k / k.clamp_min(0).sum()


def conv1_weights(kind: Conv1Kind, in_channels: int, gain: float) -> Tensor:
    """W1 of shape (4, ``in_channels``, 5, 5), float32, for ``kind`` (see the module docstring)."""
    if in_channels not in (1, 2):
        raise ValueError(f"in_channels={in_channels} is not allowed; use 1 (merged) or 2 (OFF, ON)")
    if not gain > 0:
        raise ValueError(f"conv1 gain={gain} is not allowed; use a positive number")
    w = torch.zeros(N_FEATURES, in_channels, KSIZE, KSIZE, dtype=torch.float64)
    if kind == "gabor":
        for o, t in enumerate(ORIENTATIONS_DEG):
            w[o, :] = _normalise(gabor(t))
    elif kind == "dog_gabor":
        d = dog(1.0, 2.0, 9)  # DoG on a wider support, so the 5x5 crop of the product is not truncated twice
        for o, t in enumerate(ORIENTATIONS_DEG):
            g = gabor(t, size=9)
            full = F.conv2d(g[None, None], d.flip(0, 1)[None, None], padding=4)[0, 0]
            w[o, :] = _normalise(full[2:7, 2:7])
    elif kind == "dog":
        on, off = _normalise(dog(1.0, 2.0)), _normalise(-dog(1.0, 2.0))
        if in_channels == 2:
            w[0, 0], w[1, 1], w[2, 0], w[3, 1] = on, on, off, off
        else:
            w[0, 0], w[1, 0] = on, off
            w[2, 0], w[3, 0] = _normalise(dog(0.5, 1.0)), _normalise(-dog(0.5, 1.0))
    else:
        raise ValueError(f"conv1 kind {kind!r} is not allowed; use 'dog', 'gabor' or 'dog_gabor'")
    return (w * gain).to(torch.float32)
