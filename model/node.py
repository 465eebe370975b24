"""The model node: Step -> SpikeSEG encoder -> tied decoder -> mask window -> MaskResult.

The node owns all streaming state explicitly (encoder state, mask window, instance
tracks) and drops it on :class:`StreamReset` and :meth:`ModelNode.reset`.  A whole step
stays on the model's device; only the mask (and the instance list and three spike
counts) come back to the host, with one copy per step.

Dense vs sparse: ``path`` in the config.  The dense path (:mod:`model.encoder`,
:mod:`model.decoder`) is the reference and the only one on CUDA; ``model/sparse.py``
(event-driven, spike-identical, CPU only) runs for ``path: sparse`` and for ``auto`` on
CPU.  Decision: the choice is made per stream, not per step by input density, because
the two paths keep their membranes in different layouts (converting state every time the
density crosses ``sparse_max_density`` would cost more than it saves; the sparse path is
faster than dense on CPU up to ~8 % input density, far above what real scenes give).

Instances (HULK-SMASH, :mod:`model.instances`): on the dense path the node decodes every
classification spike on its own (``dense_spike_supports``, up to 64 per step) -- this
costs up to 64 decoder passes per step on the dense path; set ``instances: false`` when
only masks are needed.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from stream.config import Config
from stream.events import Instance, MaskResult, SensorSize, Step, StreamReset
from stream.node import NodeError, RunContext, Transform, UsageError

from .checkpoint import DEFAULT_WEIGHTS, load_into
from .config import ModelConfig
from .decoder import MaskWindowState, decode_mask, window_step
from .encoder import LAYERS, Encoder, EncoderOutput, EncoderState

__all__ = ["ModelConfig", "ModelNode", "build_model_node"]


def _optional_module(name: str) -> ModuleType | None:
    """Import ``model.<name>`` if the file exists (written by another helper), else None.

    find_spec first, so a real ImportError inside an existing module is raised, not swallowed.
    """
    full = f"{__package__}.{name}"
    if importlib.util.find_spec(full) is None:
        return None
    return importlib.import_module(full)


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r} is not valid ({e}); use cpu, cuda or cuda:N") from None


class ModelNode(Transform):
    """SpikeSEG as a pipeline stage (name ``model``)."""

    name = "model"

    def __init__(
        self,
        cfg: Config,
        size: SensorSize,
        in_channels: int,
        device: str | torch.device,
        weights: str | None = None,
    ) -> None:
        mc = cfg["model"] if isinstance(cfg, dict) else cfg
        if not isinstance(mc, ModelConfig):
            raise UsageError(f"model node needs the resolved 'model' config section, got {type(mc).__name__}")
        if in_channels not in (1, 2):
            raise UsageError(f"in_channels={in_channels} is not allowed; use 1 (merged polarity) or 2 (OFF, ON)")
        if size.width < 4 or size.height < 4:
            raise UsageError(f"sensor size {size} is too small for the encoder; width and height must be >= 4")
        self.mc = mc
        self.size = size
        self.in_channels = in_channels
        self.device = _parse_device(device)
        w = weights if weights is not None else mc.weights
        self.weights_path = Path(w) if w is not None else DEFAULT_WEIGHTS
        if not self.weights_path.is_file():
            raise UsageError(f"weights file {self.weights_path} not found; pass an existing checkpoint or omit --weights")
        sparse_mod = _optional_module("sparse") if mc.path != "dense" else None
        if mc.path == "sparse" and (sparse_mod is None or self.device.type != "cpu"):
            raise UsageError(
                f"model.path=sparse needs model/sparse.py and device cpu (have device {self.device}); use path: dense or auto"
            )
        self._sparse_mod = sparse_mod if self.device.type == "cpu" else None
        self._instances_mod = _optional_module("instances") if mc.instances else None
        self._inst_params: Any = None
        if self._instances_mod is not None:
            try:
                self._inst_params = self._instances_mod.InstanceParams(smash_tau=mc.smash_tau, ash_window=mc.ash_window)
            except ValueError as e:
                raise UsageError(f"config 'model': {e}") from None
        self._sparse_model: Any = None
        self.encoder: Encoder | None = None
        self.checkpoint_metadata: dict[str, Any] = {}
        self.reset()

    # lifecycle -------------------------------------------------------------------------
    def open(self, ctx: RunContext | None = None) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise NodeError(f"device {self.device} requested but CUDA is not available; use --device cpu")
        enc = Encoder(self.mc, self.in_channels)
        self.checkpoint_metadata = load_into(enc, self.weights_path).metadata
        self.encoder = enc.to(self.device)
        if self._sparse_mod is not None:
            self._sparse_model = self._sparse_mod.SparseSpikeSEG.from_encoder(enc)
        self.reset()

    @property
    def path(self) -> str:
        """The path in use: "sparse" or "dense"."""
        return "sparse" if self._sparse_mod is not None else "dense"

    def close(self) -> None:
        self.encoder = None
        self._sparse_model = None
        self.reset()

    def reset(self) -> None:
        """Drop every piece of streaming state (membranes, fire-once, first-spike times, window, tracks)."""
        self._enc_state: EncoderState | None = None
        self._sp_state: Any = None
        self._win_state: MaskWindowState | None = None
        self._inst_state: Any = None

    # processing ------------------------------------------------------------------------
    def process(self, item: Step | StreamReset) -> list[MaskResult | StreamReset]:
        if isinstance(item, StreamReset):
            self.reset()
            if item.size is not None:
                if item.size.width < 4 or item.size.height < 4:
                    raise NodeError(f"stream reset to size {item.size}; the encoder needs width and height >= 4")
                self.size = item.size
            return [item]
        return list(self.process_batch([item]))

    def process_batch(self, steps: list[Step]) -> list[MaskResult]:
        """Run queued steps one after another (state carries); identical to calling :meth:`process` per step.

        Decision: a Python loop over steps, not a time-batched (T-window) conv: PERF-NOTES
        measured no gain for time batching on this CPU above 128x128, and a loop keeps
        the dense and sparse paths step-exact.
        """
        if self.encoder is None:
            raise NodeError("model node used before open(); the engine must call open(ctx) first")
        with torch.inference_mode():
            return [self._one(s) for s in steps]

    def _one(self, step: Step) -> MaskResult:
        frame = step.frame
        if not isinstance(frame, torch.Tensor) or frame.dim() != 3:
            raise NodeError(f"step {step.index}: frame must be a (C, H, W) tensor, got {type(frame).__name__}")
        c, h, w = frame.shape
        if c != self.in_channels or (w, h) != (self.size.width, self.size.height):
            raise NodeError(
                f"step {step.index}: frame is {c}x{h}x{w}, the model expects {self.in_channels}x"
                f"{self.size.height}x{self.size.width}; the source must send a StreamReset with the new size"
            )
        mc = self.mc
        if self._sparse_model is not None:
            raw, counts, instances = self._sparse_step(frame)
        else:
            raw, counts, instances = self._dense_step(frame, h, w)
        mask, self._win_state = window_step(
            raw, self._win_state, mc.mask_window, mc.mask_window_mode, mc.mask_decay, mc.n_classes
        )
        return MaskResult(
            step=step,
            mask=mask.cpu().numpy(),
            instances=instances,
            layer_spikes=counts,
            model_done_ns=time.perf_counter_ns(),
        )

    def _sparse_step(self, frame: torch.Tensor) -> tuple[torch.Tensor, dict[str, int], list[Instance]]:
        spm = self._sparse_model
        sout, self._sp_state = spm.step(frame, self._sp_state)
        instances: list[Instance] = []
        if self._instances_mod is not None:
            instances, self._inst_state = self._instances_mod.sparse_instances(
                spm, self._sp_state, sout, self._inst_state, self._inst_params
            )
        counts = {k: int(sout.layer_spikes[k]) for k in LAYERS}
        return torch.from_numpy(sout.mask), counts, list(instances)

    def _dense_step(self, frame: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, dict[str, int], list[Instance]]:
        enc = self.encoder
        assert enc is not None  # checked by process_batch (internal invariant, not input validation)
        mc = self.mc
        x = enc.prepare_input(frame.to(self.device, non_blocking=True))
        out, self._enc_state = enc.step(x, self._enc_state)
        # One host sync on a 0-dim bool to skip the decoder when Conv3 is silent (most steps).
        has = bool(out.has_spikes)
        if has:
            raw = decode_mask(out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold)[0]
        else:
            raw = torch.zeros((h, w), dtype=torch.uint8, device=x.device)
        n1, n2, n3 = torch.stack([out.layer_spikes[k].sum() for k in LAYERS]).to(torch.int64).cpu().tolist()
        instances = self._dense_instances(out, has, h, w) if self._instances_mod is not None else []
        return raw, {"conv1": n1, "conv2": n2, "conv3": n3}, instances

    def _dense_instances(self, out: EncoderOutput, has: bool, h: int, w: int) -> list[Instance]:
        """HULK-SMASH on the dense path: per-spike supports, Conv2 history, tracking (model/instances.py)."""
        im, enc, mc = self._instances_mod, self.encoder, self.mc
        assert enc is not None
        if self._inst_state is None:
            self._inst_state = im.fresh_instance_state(h, w, self._inst_params)
        if has:
            supports, classes, _ = im.dense_spike_supports(
                out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold, self._inst_params.max_spikes
            )
        else:
            supports = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64))
            classes = np.zeros(0, np.int64)
        # Conv2 spikes as flat channels-last indices (y * W2 + x) * 36 + f, the history's layout
        s2 = torch.nonzero(out.layer_spikes["conv2"][0].permute(1, 2, 0).reshape(-1)).flatten().cpu().numpy()
        found, self._inst_state = im.instances_step(supports, classes, s2, w, self._inst_state, self._inst_params)
        return list(found)


def build_model_node(
    cfg: Config, size: SensorSize, in_channels: int, device: str | torch.device, weights: str | None = None
) -> ModelNode:
    """What the engine calls to build the model stage (validates only; ``open`` loads)."""
    return ModelNode(cfg, size, in_channels, device, weights)
