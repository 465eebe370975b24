"""The ``model`` config section: one frozen dataclass, defaults here and nowhere else.

The preset name is top level (``preset: igarss2023``), not in this section; presets in
``configs/presets/`` overlay this section with paper-exact values.  The defaults are the
IGARSS 2023 network calibrated for 1 ms event bins: every threshold stays at the paper's
theta = 10 and lambda2 = 1; what the papers leave free or what the bin length sets is
calibrated on the held-out synthetic benchmark (docs/quality.md, ``run.py eval --sweep``):

* ``conv1_gain`` = 25.6 (the current from a fully covered positive Conv1 lobe; the papers
  filtered grey-level images, we filter binary event maps);
* ``lambda1`` = 1.6 (the paper's 9 = 90 % of theta per step keeps almost no charge between
  1 ms bins: Conv1 then fires on a handful of pixels, event IoU 0.49, below a plain density
  filter's 0.55; at 1.6 the model scores 0.85 event IoU / 0.75 volume informedness);
* ``mask_window`` = 5 steps, union (the gated mask of one step covers only that step's
  Conv1 spikes, dots along an edge; five 1 ms steps join them into a contour without
  smearing a moving object by more than a pixel or two).

Cost of the calibration: the scene drives Conv2/Conv3 much harder than at lambda1 = 9
(thousands of Conv2 spikes per step instead of ~80), which is what the event-driven path
then pays for (benchmarks/README.md).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

from stream.config import section

from .conv1 import Conv1Kind

Threshold = float | tuple[float, ...]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    Execution: ``path`` ("auto": the event-driven path on CPU, dense on CUDA or with
    ``adapt.enabled``; chosen once per node; ``sparse_max_density`` is not read by the node),
    ``decode_threads`` (event-driven path: the step's mask and per-spike supports are decoded
    on this many threads, the model thread plus helpers; 1 = no helper thread, the default:
    worth raising only when a core is otherwise idle), ``overlap`` (event-driven path with
    instances: within a micro-batch of queued steps, a helper thread runs step t's HULK-SMASH
    while the model thread encodes step t + 1; same results, uses a second core),
    ``compile`` (dense window path, i.e. CUDA: the neuron updates of a window as one compiled
    kernel per layer, verified against eager at open; "auto" = on CUDA, falls back to eager
    with a warning), ``weights`` (checkpoint path; None = model/weights/default.pt), ``seed`` for the
    initialisation of untrained weights.
    """

    conv1: Conv1Kind = "gabor"
    conv1_gain: float = 25.6
    input_mode: Literal["binary", "count"] = "binary"
    theta1: Threshold = 10.0
    theta2: Threshold = 10.0
    theta3: Threshold = 10.0
    leak: Literal["subtractive", "multiplicative"] = "subtractive"
    lambda1: float = 1.6
    lambda2: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.9
    fire_once: bool = False
    n_classes: int = 1
    decoder_threshold: float = 0.0
    decoder_gate: bool = True
    mask_window: int = 5
    mask_window_mode: Literal["union", "decay"] = "union"
    mask_decay: float = 0.8
    instances: bool = True
    smash_tau: float = 0.1
    ash_window: int = 10
    path: Literal["auto", "dense", "sparse"] = "auto"
    sparse_max_density: float = 0.02
    # 1 by default: in the pipeline the second core runs the source and the sinks; measured
    # (2 cores, built-in scene, 346x260): model node alone 612 -> 695 steps/s with 2, but the
    # live pipeline dropped more bins with 2 (46 % -> 53-57 %) and `make demo` was unchanged
    decode_threads: int = 1
    # "auto": on where this process may use >= 4 CPUs.  Measured on 2 cores (346x260, built-in
    # scene, after the one-call kernels): the node alone ~1,200 -> 1,500-1,900 steps/s, but the
    # live pipeline, whose second core runs the paced source, the sinks and the subscriber,
    # dropped 1-8 % of its bins with it against 0-2 % without (benchmarks/README.md, row u2)
    overlap: Literal["auto"] | bool = "auto"
    # the dense window path's neuron recurrence as one compiled kernel per layer (model/fused.py).
    # "auto": on CUDA, checked against eager at open, eager with a warning if it fails there;
    # true: the same, but a failure is an error; false: eager (~7 launches per layer per step)
    compile: Literal["auto"] | bool = "auto"
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
        if not (1 <= self.decode_threads <= 16):
            raise ValueError(f"decode_threads={self.decode_threads} is not allowed; use 1..16 (1 = no helper thread)")
        if self.weights is not None and not self.weights.strip():
            raise ValueError("weights is an empty string; give a checkpoint path or leave it null")

    def overlap_enabled(self) -> bool:
        """Whether the node runs HULK-SMASH on a helper thread (``overlap``; ``auto``: >= 4 usable CPUs)."""
        if self.overlap == "auto":
            return usable_cpus() >= 4
        return bool(self.overlap)

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
