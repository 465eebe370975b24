"""The ``model`` config section: one frozen dataclass, defaults here and nowhere else.

The preset name is top level (``preset: igarss2023``), not in this section; presets in
``configs/presets/`` overlay this section.  Defaults are the IGARSS 2023 network
(theta = 10 in all layers, lambda1 = 9, lambda2 = 1, subtractive leak) with what the paper
leaves free calibrated for event input: gabor Conv1, binary input, ``conv1_gain`` = 32.

Calibration (paper thresholds kept; measured with a 5 ms bin, see model/conv1.py for the
gain's meaning): 01_dvxplorer_person.aedat4 (320x240, 949 events/step): Conv1 spikes per
step mean 93 / p95 194, Conv2 1018 / 2864, Conv3 249 / 611, Conv3 active on 87 % of steps;
a moving-disc + small-square scene at 346x260 (414 events/step): Conv1 98 / 121,
Conv2 1584 / 2307, Conv3 312 / 365.  Gain 24 gives ~15 Conv1 spikes per step on the
recording and nothing at 1 ms bins; gain 40 saturates Conv2 (4200 / step).  With 1 ms bins
(190 events/step on the recording) Conv1 with lambda1 = 9 per step sees too few coincident
events to fire; 5 ms bins are the recommended default.  ``mask_window`` = 3 steps
(15 ms at 5 ms bins): the gated mask of one step covers only that step's Conv1 spikes
(sparse dots along an edge); three steps join them into a contour without smearing a
moving object by more than a few pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stream.config import section

from .conv1 import Conv1Kind

Threshold = float | tuple[float, ...]


def _check_theta(name: str, value: Threshold, n_channels: int | None) -> None:
    vals = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and n_channels is not None and len(value) not in (1, n_channels):
        raise ValueError(f"{name} has {len(value)} values; give one number or one per channel ({n_channels})")
    for v in vals:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={value!r} is not allowed; thresholds must be finite numbers > 0")


@section("model")
@dataclass(frozen=True)
class ModelConfig:
    """SpikeSEG encoder/decoder, mask and instance options.

    Conv1: ``conv1`` kernel kind, ``conv1_gain`` (current from a fully covered positive lobe),
    ``input_mode`` ("binary": a pixel with any event counts 1; "count": event counts).
    Neurons: ``theta1..3`` (number or per-channel list), ``leak`` for Conv1/Conv2
    ("subtractive" uses ``lambda1/2``, "multiplicative" uses ``beta1/2``), Conv3 is IF;
    ``fire_once``: at most one spike per neuron between resets.
    Decoder: ``decoder_threshold`` (saliency must exceed it), ``decoder_gate`` (unpooled maps
    multiplied by the same step's pre-pool spikes), ``mask_window`` steps combined by
    ``mask_window_mode`` ("union": lit in any of the last N raw masks, newest class wins;
    "decay": per-class presence ``A <- mask_decay * A + onehot(mask)``, kept while
    ``max A >= mask_decay ** (N - 1)``, so often-lit pixels persist longer).
    Instances: ``instances``, ``smash_tau``, ``ash_window`` (HULK-SMASH, model/instances.py).
    Execution: ``path`` ("auto" picks sparse below ``sparse_max_density`` input density),
    ``weights`` (checkpoint path; None = model/weights/default.pt), ``seed`` for the
    initialisation of untrained weights.
    """

    conv1: Conv1Kind = "gabor"
    conv1_gain: float = 32.0
    input_mode: Literal["binary", "count"] = "binary"
    theta1: Threshold = 10.0
    theta2: Threshold = 10.0
    theta3: Threshold = 10.0
    leak: Literal["subtractive", "multiplicative"] = "subtractive"
    lambda1: float = 9.0
    lambda2: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.9
    fire_once: bool = False
    n_classes: int = 1
    decoder_threshold: float = 0.0
    decoder_gate: bool = True
    mask_window: int = 3
    mask_window_mode: Literal["union", "decay"] = "union"
    mask_decay: float = 0.8
    instances: bool = True
    smash_tau: float = 0.1
    ash_window: int = 10
    path: Literal["auto", "dense", "sparse"] = "auto"
    sparse_max_density: float = 0.02
    weights: str | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if not (math.isfinite(self.conv1_gain) and self.conv1_gain > 0):
            raise ValueError(f"conv1_gain={self.conv1_gain} is not allowed; use a number > 0")
        if not (1 <= self.n_classes <= 254):
            raise ValueError(f"n_classes={self.n_classes} is not allowed; use 1..254 (mask values are uint8)")
        _check_theta("theta1", self.theta1, 4)
        _check_theta("theta2", self.theta2, 36)
        _check_theta("theta3", self.theta3, self.n_classes)
        for name in ("lambda1", "lambda2"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v} is not allowed; use a number >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (0 <= v <= 1):
                raise ValueError(f"{name}={v} is not allowed; use 0 <= beta <= 1")
        if not math.isfinite(self.decoder_threshold) or self.decoder_threshold < 0:
            raise ValueError(f"decoder_threshold={self.decoder_threshold} is not allowed; use a number >= 0")
        if not (1 <= self.mask_window <= 10_000):
            raise ValueError(f"mask_window={self.mask_window} is not allowed; use 1..10000 steps")
        if not (0 < self.mask_decay < 1):
            raise ValueError(f"mask_decay={self.mask_decay} is not allowed; use 0 < mask_decay < 1")
        if not (0 < self.smash_tau <= 1):
            raise ValueError(f"smash_tau={self.smash_tau} is not allowed; use 0 < smash_tau <= 1")
        if self.ash_window < 1:
            raise ValueError(f"ash_window={self.ash_window} is not allowed; use >= 1 steps")
        if not (0 <= self.sparse_max_density <= 1):
            raise ValueError(f"sparse_max_density={self.sparse_max_density} is not allowed; use 0..1")
        if self.weights is not None and not self.weights.strip():
            raise ValueError("weights is an empty string; give a checkpoint path or leave it null")

    @classmethod
    def from_paper(cls, name: str, **overrides: object) -> "ModelConfig":
        """The ``model`` section of preset ``name`` (``configs/presets/NAME.yaml``) plus ``overrides``."""
        from stream.config import PRESET_DIR, build, read_yaml
        from stream.node import UsageError

        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise UsageError(f"unknown paper preset {name!r}; use igarss2023 or kheradpisheh2018")
        data = dict(read_yaml(path).get("model") or {})
        data.update(overrides)
        return build(cls, data, "model")
