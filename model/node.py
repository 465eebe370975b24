"""The model node: Step -> SpikeSEG encoder -> tied decoder -> mask window -> MaskResult.

The node owns all streaming state explicitly (encoder state, mask window, instance
tracks) and drops it on :class:`StreamReset` and :meth:`ModelNode.reset`.  A whole step
stays on the model's device; only the mask (and the instance list and three spike
counts) come back to the host, with one copy per step.

Dense vs sparse: ``path`` in the config.  The dense path (:mod:`model.encoder`) is the
reference; ``model/sparse.py`` (event-driven, bit-identical) is used for ``path:
sparse`` and for ``auto`` when the step's input density is below ``sparse_max_density``,
once that module exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

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
        self._sparse = _optional_module("sparse") if mc.path != "dense" else None
        if mc.path == "sparse" and self._sparse is None:
            raise UsageError("model.path=sparse needs model/sparse.py, which this build lacks; use path: dense or auto")
        # Call site for HULK-SMASH (model/instances.py, another helper's): see _instances().
        self._instances_mod = _optional_module("instances") if mc.instances else None
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
        self.reset()

    def close(self) -> None:
        self.encoder = None
        self.reset()

    def reset(self) -> None:
        """Drop every piece of streaming state (membranes, fire-once, first-spike times, window, tracks)."""
        self._enc_state: EncoderState | None = None
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
        enc = self.encoder
        assert enc is not None  # checked by process_batch (internal invariant, not input validation)
        frame = step.frame
        if not isinstance(frame, torch.Tensor) or frame.dim() != 3:
            raise NodeError(f"step {step.index}: frame must be a (C, H, W) tensor, got {type(frame).__name__}")
        c, h, w = frame.shape
        if c != self.in_channels or (w, h) != (self.size.width, self.size.height):
            raise NodeError(
                f"step {step.index}: frame is {c}x{h}x{w}, the model expects {self.in_channels}x"
                f"{self.size.height}x{self.size.width}; the source must send a StreamReset with the new size"
            )
        x = enc.prepare_input(frame.to(self.device, non_blocking=True))
        out, self._enc_state = self._encode(x, step)
        mc = self.mc
        # One host sync on a 0-dim bool to skip the decoder when Conv3 is silent (most steps).
        if bool(out.has_spikes):
            raw = decode_mask(out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold)[0]
        else:
            raw = torch.zeros((h, w), dtype=torch.uint8, device=x.device)
        mask, self._win_state = window_step(
            raw, self._win_state, mc.mask_window, mc.mask_window_mode, mc.mask_decay, mc.n_classes
        )
        counts = torch.stack([out.layer_spikes[k].sum() for k in LAYERS]).to(torch.int64)
        instances = self._instances(out, mask)
        mask_np = mask.cpu().numpy()
        n1, n2, n3 = counts.cpu().tolist()
        return MaskResult(
            step=step,
            mask=mask_np,
            instances=instances,
            layer_spikes={"conv1": n1, "conv2": n2, "conv3": n3},
            model_done_ns=time.perf_counter_ns(),
        )

    def _encode(self, x: torch.Tensor, step: Step) -> tuple[EncoderOutput, EncoderState]:
        enc = self.encoder
        assert enc is not None
        sp = self._sparse
        if sp is not None and hasattr(sp, "encoder_step_sparse"):
            density = step.n_events / float(self.size.width * self.size.height)
            if self.mc.path == "sparse" or density < self.mc.sparse_max_density:
                # Interface agreed with model/sparse.py: same arguments and results as Encoder.step.
                return sp.encoder_step_sparse(enc, x, self._enc_state)
        return enc.step(x, self._enc_state)

    def _instances(self, out: EncoderOutput, mask: torch.Tensor) -> list[Instance]:
        """HULK-SMASH call site.  Until model/instances.py provides ``instances_step`` this returns []."""
        mod = self._instances_mod
        if mod is None or not hasattr(mod, "instances_step"):
            return []  # TODO(instances helper): remove once model/instances.py ships instances_step
        enc = self.encoder
        assert enc is not None
        found, self._inst_state = mod.instances_step(out, enc, mask, self._inst_state, self.mc)
        return list(found)


def build_model_node(
    cfg: Config, size: SensorSize, in_channels: int, device: str | torch.device, weights: str | None = None
) -> ModelNode:
    """What the engine calls to build the model stage (validates only; ``open`` loads)."""
    return ModelNode(cfg, size, in_channels, device, weights)
