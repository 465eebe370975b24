"""The model node: Step -> SpikeSEG encoder -> tied decoder -> mask window -> MaskResult.

The node owns all streaming state explicitly (encoder state, mask window, instance
tracks) and drops it on :class:`StreamReset` and :meth:`ModelNode.reset`.

Paths (``model.path``), chosen once per node, never per step:

* ``sparse`` (CPU): :class:`model.sparse.SparseSpikeSEG`, event-driven numba kernels whose
  cost follows events and spikes, spike-identical to the dense path.
* ``dense``: :mod:`model.encoder` / :mod:`model.decoder` in torch; the reference, and the
  path on CUDA.
* ``auto``: sparse on CPU, dense on CUDA.  Decision: per node, not per step by input
  density, because the two paths keep membranes in different layouts (converting them
  whenever the density crossed a bound would cost more than it saves; the sparse path beats
  dense on this CPU up to ~8 % input density, far above what real scenes give).  With
  online adaptation (``adapt.enabled``) ``auto`` is dense: the adapter reads the dense
  step's pooled maps and membranes and updates the torch weights in place.

Exactness: every weight is on the 2^-12 grid (:func:`model.encoder.quantize_weights`, also
re-applied after each adaptation update), so every path and batch size gives the same
spikes, masks and instances bit for bit.

Micro-batches: :meth:`ModelNode.process_batch` takes the steps the engine dequeued at
once.  On CUDA (``batch_mode="auto"``) the dense path runs them as one window
(:func:`model.encoder.encoder_window`: one conv per layer for all T steps, the neuron
recurrence in order -- fused into one compiled kernel per layer with ``model.compile``
(:mod:`model.fused`) --, one full-frame decode of all the steps whose Conv3 fired, two
host copies per window); on CPU it loops over steps (windows do not pay on 2 cores,
PERF-NOTES) and decodes the mask from per-spike crops (float64 full-frame convs are slow there).

Instances (HULK-SMASH, :mod:`model.instances`): every classification spike is decoded on
its own; sparse path: :meth:`SparseSpikeSEG.spike_supports`; dense path:
:func:`model.instances.crop_spike_supports` (all spikes of a step as one batch, each in the
40x40 pixel crop its receptive field can reach, instead of a full-frame pass per spike).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch

from stream.config import Config
from stream.events import Instance, MaskResult, SensorSize, Step, StreamReset, make_events
from stream.node import NodeError, RunContext, Transform, UsageError

from . import instances as inst
from .checkpoint import DEFAULT_WEIGHTS, load_into
from .config import ModelConfig
from . import fused
from .decoder import MaskWindowState, decode_mask, decode_mask_crops, union_window_np, window_step, window_steps
from .encoder import Encoder, EncoderOutput, EncoderState, scan_steps
from .fused import CompiledScan
from .side import Overlap, SideThreads
from .sparse import SparseSpikeSEG

# share of the decoded spikes given to the model thread, which also decodes the joint mask
# (measured at 346x260 on the built-in scene: the mask costs ~0.6x the supports of 64 spikes;
# with the threads slowing each other, 0.4 .. 0.6 measured the same within noise)
_MASK_VS_SUPPORTS = 0.5

#: the dense joint mask on CPU (``dense_decode="auto"``): a per-spike 40 x 40 crop costs
#: about as much as a full-frame float64 decode of this many pixels (measured on 2 cores:
#: crops 0.4-0.55 ms per spike, full frame 0.22-0.54 us per pixel at 64x64 .. 640x480), so a
#: step is decoded by crops when its spikes x this < its pixels x classes, else full frame
CROP_PIXELS_PER_SPIKE = 1200

#: overlap pipeline: HULK-SMASH jobs in flight on the helper while the model thread encodes on
#: (``OVERLAP_DEPTH + 1`` banks of pooling lists, ~12 MB each at 346x260)
OVERLAP_DEPTH = 2

__all__ = ["ModelConfig", "ModelNode", "build_model_node"]

BatchMode = Literal["auto", "steps", "window"]
DenseDecode = Literal["auto", "crops", "full"]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r} is not valid ({e}); use cpu, cuda or cuda:N") from None


def _rows(out: EncoderOutput, rows: torch.Tensor) -> EncoderOutput:
    """The batch rows ``rows`` of a windowed :class:`EncoderOutput` (for a batched decode)."""
    pick = lambda t: t.index_select(0, rows)  # noqa: E731
    return out._replace(
        classification_spikes=pick(out.classification_spikes),
        pooling_indices=(pick(out.pooling_indices[0]), pick(out.pooling_indices[1])),
        layer_spikes={k: pick(v) for k, v in out.layer_spikes.items()},
        has_spikes=pick(out.has_spikes),
        n_classification_spikes=pick(out.n_classification_spikes),
    )


class _SparseWindow:
    """``union`` mask window state of the sparse path (numpy): newest lighting step per pixel and the window mask."""

    def __init__(self, h: int, w: int, n: int) -> None:
        self.last = np.full(h * w, -(1 << 40), np.int64)
        self.ring: list[np.ndarray] = [np.zeros(0, np.int64)] * n  # pixels lit at each of the last n steps (slot t % n)
        self.out = np.zeros(h * w, np.uint8)  # the window mask, kept up to date in place
        self.t = 0


class ModelNode(Transform):
    """SpikeSEG as a pipeline stage (name ``model``).

    ``cfg``: the resolved config (the ``model`` section; ``adapt`` and ``train`` when
    adaptation is enabled) or a bare :class:`ModelConfig`.  ``batch_mode``: how
    :meth:`process_batch` runs the dense path: ``window`` (layer by layer over the batch),
    ``steps`` (one step at a time) or ``auto`` (window on CUDA, steps on CPU).
    """

    name = "model"

    def __init__(
        self,
        cfg: Config | ModelConfig,
        size: SensorSize,
        in_channels: int,
        device: str | torch.device,
        weights: str | None = None,
        batch_mode: BatchMode = "auto",
        dense_decode: DenseDecode = "auto",
    ) -> None:
        mc = cfg["model"] if isinstance(cfg, dict) else cfg
        if not isinstance(mc, ModelConfig):
            raise UsageError(f"model node needs the resolved 'model' config section, got {type(mc).__name__}")
        if in_channels not in (1, 2):
            raise UsageError(f"in_channels={in_channels} is not allowed; use 1 (merged polarity) or 2 (OFF, ON)")
        if size.width < 4 or size.height < 4:
            raise UsageError(f"sensor size {size} is too small for the encoder; width and height must be >= 4")
        if batch_mode not in ("auto", "steps", "window"):
            raise UsageError(f"batch_mode={batch_mode!r} is not allowed; use auto, steps or window")
        if dense_decode not in ("auto", "crops", "full"):
            raise UsageError(f"dense_decode={dense_decode!r} is not allowed; use auto, crops or full")
        self.mc = mc
        self.size = size
        self.in_channels = in_channels
        self.device = _parse_device(device)
        w = weights if weights is not None else mc.weights
        self.weights_path = Path(w) if w is not None else DEFAULT_WEIGHTS
        if not self.weights_path.is_file():
            raise UsageError(f"weights file {self.weights_path} not found; pass an existing checkpoint or omit --weights")
        acfg = cfg.get("adapt") if isinstance(cfg, dict) else None
        self.adapter: Any = None
        if acfg is not None and acfg.enabled:
            from .adapt import OnlineAdapter  # lazily: only runs with --adapt import the learning code

            self.adapter = OnlineAdapter(cfg)  # type: ignore[arg-type]
        cpu = self.device.type == "cpu"
        if mc.path == "sparse" and not cpu:
            raise UsageError(f"model.path=sparse runs on CPU only (have device {self.device}); use path: dense or auto")
        if mc.path == "sparse" and self.adapter is not None:
            raise UsageError("--adapt needs the dense model path (it updates the torch weights); set model.path: dense or auto")
        self._path = "sparse" if mc.path in ("sparse", "auto") and cpu and self.adapter is None else "dense"
        self._windowed = self._path == "dense" and self.adapter is None and (
            batch_mode == "window" or (batch_mode == "auto" and not cpu)
        )
        # the dense joint mask: full-frame transposed convs (~15 launches for every row of a
        # window) on CUDA (the crops cost ~200 launches per 512 spikes, which is what made a
        # GPU step launch-bound); on CPU whichever costs less for the step's spike count
        # (CROP_PIXELS_PER_SPIKE: float64 has no MKL-DNN kernels there, 20-30 ms per full
        # frame at 346x260, ~0.45 ms per spike's crop).  Same masks bit for bit either way.
        self._decode_choice = "cost" if dense_decode == "auto" and cpu else ("crops" if dense_decode == "crops" else "full")
        if mc.compile is True and not self._windowed:
            raise UsageError(
                "model.compile: true compiles the dense window path, which runs on CUDA; this node runs the "
                f"{self._path} path on {self.device}; set model.compile: auto or false"
            )
        self._compile = self._windowed and (mc.compile is True or (mc.compile == "auto" and not cpu))
        self._scan: CompiledScan | None = None
        self._inst_params: inst.InstanceParams | None = None
        if mc.instances:
            try:
                self._inst_params = inst.InstanceParams(smash_tau=mc.smash_tau, ash_window=mc.ash_window)
            except ValueError as e:
                raise UsageError(f"config 'model': {e}") from None
        self._sparse_model: SparseSpikeSEG | None = None
        self._side: SideThreads | None = None
        self._overlap: Overlap | None = None
        self._adapter_open = False
        self.encoder: Encoder | None = None
        self.checkpoint_metadata: dict[str, Any] = {}
        self.reset()

    # lifecycle -------------------------------------------------------------------------
    def open(self, ctx: RunContext | None = None) -> None:
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise NodeError(f"device {self.device} requested but CUDA is not available; use --device cpu")
            # TF32 keeps 10 mantissa bits: weights on the 2^-12 grid would be truncated and
            # the GPU's spikes would differ from the CPU's.  Process-wide switch (torch has no
            # per-call one); the alternative, float64 convs, costs 2x bandwidth.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        enc = Encoder(self.mc, self.in_channels)
        self.checkpoint_metadata = load_into(enc, self.weights_path).metadata
        self.encoder = enc.to(self.device)
        if self._path == "sparse":
            self._sparse_model = SparseSpikeSEG.from_encoder(enc)
            self._side = SideThreads(self.mc.decode_threads)
            if self.mc.overlap_enabled() and self._inst_params is not None:
                self._overlap = Overlap()
            self._warm_up()
        if self._compile:
            self._scan = self._compiled_scan(self.encoder)
        if self.adapter is not None:
            self.adapter.open(ctx, self.encoder)
            self._adapter_open = True
        self.reset()

    def _compiled_scan(self, enc: Encoder) -> CompiledScan | None:
        """The fused neuron scan, compiled and checked against eager now (before the stream runs).

        ``model.compile: auto``: a failure (no compiler backend, or a result that differs from
        eager) warns and returns None (eager); ``true``: it raises.
        """
        params = enc.params()
        if not any(fused.compilable(p) for p in params):
            return None  # multiplicative leak everywhere (kheradpisheh2018): nothing exact to compile
        h, w = self.size.height, self.size.width
        shapes = [(enc.w1.shape[0], h, w), (enc.w2.shape[0], h // 2, w // 2), (enc.w3.shape[0], h // 4, w // 4)]
        scan = CompiledScan(scan_steps)
        try:
            with torch.inference_mode():
                fused.verify(scan, shapes, params, self.device)
        except Exception as e:  # noqa: BLE001 -- compiler backends raise many types; all mean "not here"
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if self.mc.compile is True:
                raise NodeError(f"model.compile: true, but the compiled neuron scan failed on {self.device}: {why}; "
                                "set model.compile: false") from None
            warnings.warn(f"model.compile: auto: the compiled neuron scan failed on {self.device} ({why}); "
                          "running it eager (set model.compile: false to skip the try)", RuntimeWarning, stacklevel=2)
            return None
        return scan

    def _warm_up(self) -> None:
        """Load every compiled kernel of the event-driven path now, on a throw-away 16x16 state.

        numba loads a kernel from its on-disk cache on the first call (~70 ms for the whole
        path, more after a code change); without this the first bins of a live stream wait
        for it and are dropped.  Same argument types as the real calls, so the same
        signatures are loaded; no output is kept.
        """
        spm = self._sparse_model
        assert spm is not None  # internal invariant: called from open() on the sparse path
        st = spm.fresh_state(16, 16)
        c = self.in_channels
        ev = make_events(np.arange(8), np.arange(8) + 4, np.full(8, 8), np.arange(8) % c)
        out, st = spm.step(None, st, events=ev, decode=False)
        one = np.zeros(1, np.int64)  # a pretend Conv3 spike: the decode kernels run (on no entries)
        out = spm.decode_mask(out._replace(s3=one), st)
        sup = spm.spike_supports(st, one)
        if self._inst_params is not None:
            inst.sparse_instances(spm, st, out, None, self._inst_params, supports=(one, sup, 0))
            inst.sparse_hulk(spm, st, out, None, self._inst_params, one, 0)
            ist = inst.fresh_instance_state(16, 16, self._inst_params)
            ist.tracks = [(1, 1, (0, 0, 3, 3))]  # the matcher runs only with objects and tracks
            inst.track([(1, (0, 0, 3, 3), 16)], ist, self._inst_params.track_iou)
        w = _SparseWindow(16, 16, 2)
        union_window_np(out.mask.reshape(-1), out.lit, w.ring[0], w.last, 0, 2, w.out)

    @property
    def path(self) -> str:
        """The path in use: "sparse" or "dense"."""
        return self._path

    def close(self) -> None:
        try:
            if self._adapter_open:
                self._adapter_open = False
                self.adapter.close()  # writes the adapted checkpoint (may raise NodeError)
        finally:
            if self._side is not None:
                self._side.close()
                self._side = None
            if self._overlap is not None:
                self._overlap.close()
                self._overlap = None
            self.encoder = None
            self._scan = None
            self._sparse_model = None
            self.reset()

    def reset(self) -> None:
        """Drop every piece of streaming state (membranes, window, tracks); learned weights stay.

        The event-driven path's state and decode buffers are kept and refilled in place
        (:meth:`SparseSpikeSEG.reset_state`): new ones cost 10-22 ms at 346x260, mostly page
        faults.  They are dropped when the sensor size changes (:meth:`_sparse_encode`)."""
        if getattr(self, "_overlap", None) is not None:
            self._overlap.drain()  # a held step's HULK-SMASH (see iter_batch's ``more``): dropped with the state
        self._enc_state: EncoderState | None = None
        sp_state = getattr(self, "_sp_state", None)
        if sp_state is not None and self._sparse_model is not None:
            self._sparse_model.reset_state(sp_state)
        else:
            self._sp_state: Any = None
            self._side_scratch: list[dict[str, np.ndarray]] = []
            self._ov_scratch: dict[str, np.ndarray] | None = None
        self._win_state: MaskWindowState | None = None
        self._sp_win: _SparseWindow | None = None
        ist = getattr(self, "_inst_state", None)
        if ist is not None and self._path == "sparse":
            inst.reset_instance_state(ist)
        else:
            self._inst_state: inst.InstanceState | None = None
        self._events_ok: bool | None = None
        if self.adapter is not None:
            self.adapter.reset()

    # processing ------------------------------------------------------------------------
    def process(self, item: Step | StreamReset) -> list[MaskResult | StreamReset]:
        if isinstance(item, StreamReset):
            held: list[MaskResult | StreamReset] = list(self.flush())  # the last step before the reset
            self.reset()
            if item.size is not None:
                if item.size.width < 4 or item.size.height < 4:
                    raise NodeError(f"stream reset to size {item.size}; the encoder needs width and height >= 4")
                self.size = item.size
            return [*held, item]
        return list(self.process_batch([item]))

    def process_batch(self, steps: list[Step]) -> list[MaskResult]:
        """Run queued steps in order (state carries); identical to calling :meth:`process` per step."""
        return list(self.iter_batch(steps))

    def iter_batch(self, steps: list[Step], more: Callable[[], bool] | None = None) -> Iterator[MaskResult]:
        """:meth:`process_batch` that yields each result as soon as it is ready (the engine
        forwards it at once: the first step of a queued batch does not wait for the last).
        Every step is validated before the first runs.  Consume it to the end (or close it):
        the state advances as it is consumed.

        ``more``: asked once at the end of the batch; True means further steps are already
        queued and will come in the next call.  The overlap pipeline then keeps the last
        step's HULK-SMASH running and yields its result first thing in that call, instead of
        draining every micro-batch (one encoder and one HULK-SMASH unoverlapped per batch:
        ~10 % at 16 steps).  A held result also comes out of :meth:`flush`, of a
        ``StreamReset`` through :meth:`process`, and before a bad batch's error.
        """
        if self.encoder is None:
            raise NodeError("model node used before open(); the engine must call open(ctx) first")
        try:
            for s in steps:
                self._check(s)
        except NodeError:
            yield from self.flush()  # the held step was produced before the bad one: hand it on
            raise
        if self._path == "sparse":  # numpy kernels: no torch autograd state to switch off
            # (jobs still pending between calls are steps held across batches: iter_batch's ``more``)
            if self._overlap is not None and (len(steps) > 1 or self._overlap.pending):
                yield from self._sparse_overlapped(steps, more)
            else:
                for s in steps:
                    yield self._sparse_one(s)
            return
        with torch.inference_mode():
            if self._windowed and len(steps) > 1:
                results = self._dense_window(steps)
            else:
                results = [self._dense_one(s) for s in steps]
        yield from results

    def _check(self, step: Step) -> None:
        frame = step.frame
        if not isinstance(frame, torch.Tensor) or frame.dim() != 3:
            raise NodeError(f"step {step.index}: frame must be a (C, H, W) tensor, got {type(frame).__name__}")
        c, h, w = frame.shape
        if c != self.in_channels or (w, h) != (self.size.width, self.size.height):
            raise NodeError(
                f"step {step.index}: frame is {c}x{h}x{w}, the model expects {self.in_channels}x"
                f"{self.size.height}x{self.size.width}; the source must send a StreamReset with the new size"
            )

    # sparse ----------------------------------------------------------------------------
    def _sparse_encode(self, step: Step) -> Any:
        """The encoder step of the event-driven path (no decode yet); the state advances."""
        spm = self._sparse_model
        assert spm is not None  # set by open() for the sparse path (internal invariant)
        st = self._sp_state
        if st is not None and (st.grid.h, st.grid.w) != (self.size.height, self.size.width):
            # a StreamReset changed the sensor size: new state, decode buffers and instances
            st = self._sp_state = self._ov_scratch = self._inst_state = None
            self._side_scratch = []
        if st is None:
            banks = OVERLAP_DEPTH + 1 if self._overlap is not None else 1
            self._sp_state = spm.fresh_state(self.size.height, self.size.width, banks=banks)
        if self._use_events(step):
            # the bin's events give the same active-input list as the frame (verified once per
            # stream), in ~2 us instead of a ~70 us scan of the 2 x H x W frame at 346x260
            sout, self._sp_state = spm.step(None, self._sp_state, events=step.events, decode=False, entries=False)
        else:
            sout, self._sp_state = spm.step(step.frame, self._sp_state, decode=False, entries=False)
        return sout

    def flush(self) -> Iterator[MaskResult]:
        """The results held back by ``iter_batch(..., more=...)``, if any, in step order (waits
        for their HULK-SMASH).

        The engine calls it when no step is queued behind a batch it ran with ``more``.
        """
        ov = self._overlap
        if ov is not None and ov.pending:  # only the overlap pipeline holds steps
            try:
                while ov.pending:
                    yield ov.result()
            finally:
                ov.drain()

    def _sparse_overlapped(self, steps: list[Step], more: Callable[[], bool] | None = None) -> Iterator[MaskResult]:
        """The micro-batch as a two-stage pipeline on two threads; same results as :meth:`_sparse_one` per step.

        The model thread runs step t + 1's encoder and joint mask while the helper
        (:class:`model.side.Overlap`) runs step t's HULK-SMASH (per-spike supports, ASH,
        grouping, tracking), mask window and result.  Up to ``OVERLAP_DEPTH`` jobs are in
        flight, so a step whose encoder runs long and one whose HULK-SMASH runs long do not
        stall each other.  The helper reads step t's pooling lists from their own bank
        (``OVERLAP_DEPTH + 1`` banks, used in turn: step t + depth + 1 reuses step t's only
        after the result of step t was taken) and decodes with its own scratch; it alone
        touches the instance state, in step order.  Results come out in step order.
        """
        spm, ip, ov = self._sparse_model, self._inst_params, self._overlap
        assert spm is not None and ip is not None and ov is not None  # process_batch's condition
        # steps held from the previous batch: their jobs are still queued or running on the helper
        held = False
        try:
            for step in steps:
                sout = self._sparse_encode(step)
                st = self._sp_state
                if self._ov_scratch is None:
                    self._ov_scratch = spm.decode_scratch(st)
                ref = st.ref
                sout = spm.decode_mask(sout, st)
                # queue step t's job before waiting for an older one's: the helper goes from
                # one to the next without waiting for this thread to wake, yield and submit
                # (~0.1 ms per step on the critical path otherwise).  Step t + 1's encoder
                # starts only after step t - depth's job is done, so it never writes the bank
                # a job still reads.
                ov.submit(lambda sout=sout, ref=ref, st=st, step=step: self._overlap_job(spm, st, step, sout, ref))
                if ov.pending > OVERLAP_DEPTH:
                    yield ov.result()
            if ov.pending and more is not None and more():
                held = True  # their jobs run on; the next batch (or flush) yields them
                return
            while ov.pending:
                yield ov.result()
        finally:
            if not held:  # after an error or an early close: the helper is idle before anyone touches the state
                ov.drain()

    def _overlap_job(self, spm: SparseSpikeSEG, st: Any, step: Step, sout: Any, ref: Any) -> MaskResult:
        """Step t's work on the overlap helper, in step order: HULK-SMASH, the mask window, the
        result (off the model thread: benchmarks/README.md y10)."""
        ip = self._inst_params
        assert ip is not None
        spikes, skipped = inst.select_spikes(sout.s3, ip.max_spikes)
        found = self._instances_job(spm, st, sout, spikes, skipped, ref)
        return self._sparse_result(step, sout, self._sparse_window(sout), found)

    def _instances_job(self, spm: SparseSpikeSEG, st: Any, sout: Any, spikes: np.ndarray, skipped: int, ref: Any) -> list[Instance]:
        """HULK-SMASH of one step on the overlap helper (its own scratch, the step's bank ``ref``)."""
        ip = self._inst_params
        assert ip is not None and self._ov_scratch is not None
        found, self._inst_state = inst.sparse_hulk(spm, st, sout, self._inst_state, ip, spikes, skipped,
                                                   self._ov_scratch, at=ref)
        return list(found)

    def _sparse_one(self, step: Step) -> MaskResult:
        spm = self._sparse_model
        assert spm is not None  # set by open() for the sparse path (internal invariant)
        sout = self._sparse_encode(step)
        instances: list[Instance] = []
        ip = self._inst_params
        if ip is None:
            sout = spm.decode_mask(sout, self._sp_state)
        else:
            spikes, skipped = inst.select_spikes(sout.s3, ip.max_spikes)
            if self._side is not None and self._side.n > 1:
                sout, sup = self._decode_parallel(spm, sout, spikes)
                found, self._inst_state = inst.sparse_instances(spm, self._sp_state, sout, self._inst_state, ip,
                                                                supports=(spikes, sup, skipped))
            else:  # one thread: supports, history, ASH and grouping in one compiled call
                sout = spm.decode_mask(sout, self._sp_state)
                found, self._inst_state = inst.sparse_hulk(spm, self._sp_state, sout, self._inst_state, ip,
                                                           spikes, skipped)
            instances = list(found)
        return self._sparse_result(step, sout, self._sparse_window(sout), instances)

    def _sparse_window(self, sout: Any) -> np.ndarray:
        """The published mask: the step's raw mask through the mask window (a new array)."""
        mc = self.mc
        if mc.mask_window > 1 and mc.mask_window_mode == "union":
            h, w = sout.mask.shape
            if self._sp_win is None:
                self._sp_win = _SparseWindow(h, w, mc.mask_window)
            win = self._sp_win
            raw = sout.mask.reshape(-1)
            lit = sout.lit
            slot = win.t % mc.mask_window
            union_window_np(raw, lit, win.ring[slot], win.last, win.t, mc.mask_window, win.out)
            win.ring[slot] = lit
            mask = win.out.reshape(h, w).copy()
            win.t += 1
        else:
            m, self._win_state = window_step(
                torch.from_numpy(sout.mask), self._win_state, mc.mask_window, mc.mask_window_mode, mc.mask_decay,
                mc.n_classes,
            )
            mask = m.numpy()
        return mask

    @staticmethod
    def _sparse_result(step: Step, sout: Any, mask: np.ndarray, instances: list[Instance]) -> MaskResult:
        ls = sout.layer_spikes
        counts = {"conv1": int(ls["conv1"]), "conv2": int(ls["conv2"]), "conv3": int(ls["conv3"])}
        return MaskResult(step=step, mask=mask, instances=instances, layer_spikes=counts,
                          model_done_ns=time.perf_counter_ns())

    def _decode_parallel(self, spm: SparseSpikeSEG, sout: Any, spikes: np.ndarray) -> tuple[Any, Any]:
        """The step's mask and the supports of ``spikes``, split over the side threads.

        The model thread decodes the mask and the first (smaller) chunk of spikes; each
        helper decodes one chunk with its own scratch.  Supports are per spike, so the
        chunks' results concatenate to exactly the one-call result.
        """
        st = self._sp_state
        side = self._side
        n = side.n if side is not None else 1
        if len(spikes) == 0:
            return spm.decode_mask(sout, st), inst.empty_supports()
        if n == 1 or len(spikes) < 2 * n:
            return spm.decode_mask(sout, st), spm.spike_supports(st, spikes)
        while len(self._side_scratch) < n - 1:
            self._side_scratch.append(spm.decode_scratch(st))
        b = len(spikes)
        first = int(round(b * max(0.0, 1.0 - _MASK_VS_SUPPORTS * (n - 1)) / n))
        rest = np.array_split(spikes[first:], n - 1)
        jobs = [lambda: (spm.decode_mask(sout, st), spm.spike_supports(st, spikes[:first]))]
        jobs += [lambda c=c, sc=sc: spm.spike_supports(st, c, sc) for c, sc in zip(rest, self._side_scratch)]
        res = side.run(jobs)  # type: ignore[union-attr]
        sout, sup0 = res[0]
        return sout, inst.merge_supports([sup0, *res[1:]])

    def _use_events(self, step: Step) -> bool:
        """Whether ``step.events`` describe ``step.frame`` exactly (then the sparse path reads events).

        The binner bins ``step.events`` into ``step.frame`` (filters and ROI act before
        binning), so they agree; a hand-made Step may carry a frame without events.  Checked
        once per stream on the first step with events by binning them and comparing with
        the frame (binary or count, as ``input_mode`` reads it); a stream whose events do
        not match keeps using frames.  A step without events then means an empty frame.
        """
        if self._events_ok is None:
            if not len(step.events):
                return False
            ev = step.events
            c, h, w = step.frame.shape
            binned = np.zeros((c, h, w), np.float32)
            inside = (ev["x"] >= 0) & (ev["x"] < w) & (ev["y"] >= 0) & (ev["y"] < h)
            ch = ev["polarity"][inside].astype(np.int64) if c == 2 else np.zeros(int(inside.sum()), np.int64)
            np.add.at(binned, (ch, ev["y"][inside].astype(np.int64), ev["x"][inside].astype(np.int64)), 1.0)
            frame = step.frame.numpy()
            if self.mc.input_mode == "binary":
                self._events_ok = bool(np.array_equal(binned > 0, frame > 0))
            else:
                self._events_ok = bool(np.array_equal(binned, frame))
        return self._events_ok

    # dense -----------------------------------------------------------------------------
    def _dense_one(self, step: Step) -> MaskResult:
        enc = self.encoder
        assert enc is not None  # checked by process_batch (internal invariant, not input validation)
        mc = self.mc
        x = enc.prepare_input(step.frame.to(self.device, non_blocking=True))
        prev = self._enc_state
        out, self._enc_state = enc.step(x, prev, first_spikes=False)
        s1, s2, s3 = out.layer_spikes["conv1"], out.layer_spikes["conv2"], out.layer_spikes["conv3"]
        # one host sync for the three counts; n3 also decides whether to decode at all
        n1, n2, n3 = torch.stack([s1.sum(), s2.sum(), s3.sum()]).to(torch.int64).cpu().tolist()
        h, w = x.shape[-2:]
        if n3:
            raw = self._joint_masks(out, n3)[0]
        else:
            raw = torch.zeros((h, w), dtype=torch.uint8, device=x.device)
        instances = self._dense_instances(out, 0, n3, h, w, None) if self._inst_params is not None else []
        mask, self._win_state = window_step(
            raw, self._win_state, mc.mask_window, mc.mask_window_mode, mc.mask_decay, mc.n_classes
        )
        res = MaskResult(step=step, mask=mask.cpu().numpy(), instances=instances,
                         layer_spikes={"conv1": n1, "conv2": n2, "conv3": n3}, model_done_ns=time.perf_counter_ns())
        if self.adapter is not None:
            before = self.adapter.updates
            res.extra.update(self.adapter.after_step(enc, out, prev))
            if self.adapter.updates != before:
                enc.quantize_()  # back onto the 2^-12 grid: the next step's sums stay exact
        return res

    def _dense_window(self, steps: list[Step]) -> list[MaskResult]:
        """The micro-batch as one window (see module docstring); same results as :meth:`_dense_one` per step."""
        enc = self.encoder
        assert enc is not None
        mc = self.mc
        x = enc.prepare_input(torch.stack([s.frame for s in steps]).to(self.device, non_blocking=True))
        out, self._enc_state = enc.window(x, self._enc_state, self._scan)
        t_n, (h, w) = x.shape[0], x.shape[-2:]
        counts = torch.stack([out.layer_spikes[k].flatten(1).sum(1) for k in ("conv1", "conv2", "conv3")], 1)
        counts_h = counts.to(torch.int64).cpu().tolist()  # sync 1 of 2 per window
        fired = [t for t in range(t_n) if counts_h[t][2] > 0]
        raws = torch.zeros((t_n, h, w), dtype=torch.uint8, device=x.device)
        if fired:
            rows = torch.tensor(fired, device=x.device)
            raws[rows] = self._joint_masks(_rows(out, rows), sum(counts_h[t][2] for t in fired))
        masks, self._win_state = window_steps(raws, self._win_state, mc.mask_window, mc.mask_window_mode,
                                              mc.mask_decay, mc.n_classes)
        masks_h = masks.cpu().numpy()  # sync 2 of 2
        s2_rows: list[np.ndarray] | None = None
        if self._inst_params is not None:
            s2 = out.layer_spikes["conv2"]
            nz = torch.nonzero(s2.permute(0, 2, 3, 1).reshape(t_n, -1)).cpu().numpy()
            bounds = np.searchsorted(nz[:, 0], np.arange(t_n + 1))
            s2_rows = [nz[bounds[t] : bounds[t + 1], 1] for t in range(t_n)]
        sups: dict[int, Any] = {}
        if s2_rows is not None and fired:
            # every fired row's per-spike supports in one batch of crops (not one per step)
            params = self._inst_params
            assert params is not None
            sups = dict(zip(fired, inst.crop_spike_supports_rows(
                out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold, params.max_spikes, fired)))
        done = time.perf_counter_ns()
        results = []
        for t, step in enumerate(steps):
            n1, n2, n3 = counts_h[t]
            found = self._dense_instances(out, t, n3, h, w, s2_rows[t], sups.get(t)) if s2_rows is not None else []
            results.append(MaskResult(step=step, mask=masks_h[t], instances=found,
                                      layer_spikes={"conv1": n1, "conv2": n2, "conv3": n3}, model_done_ns=done))
        return results

    def _joint_masks(self, out: EncoderOutput, n_spikes: int) -> torch.Tensor:
        """Raw masks (R, H, W) uint8 of the rows of ``out`` (all fired, ``n_spikes`` Conv3 spikes in
        all): full frame or crops (see ``__init__``)."""
        enc, mc = self.encoder, self.mc
        assert enc is not None
        if self._use_full_decode(out.classification_spikes.shape, n_spikes):
            return decode_mask(out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold)
        return decode_mask_crops(out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold)

    def _use_full_decode(self, s3_shape: torch.Size, n_spikes: int) -> bool:
        """Whether :meth:`_joint_masks` decodes rows of ``s3_shape`` (R, n_cls, H/4, W/4) holding
        ``n_spikes`` spikes full frame (else by per-spike crops)."""
        if self._decode_choice != "cost":
            return self._decode_choice == "full"
        h, w = self.size.height, self.size.width
        # the full-frame decoder runs one H x W map per class and row (model.decoder.decode_saliency)
        return n_spikes * CROP_PIXELS_PER_SPIKE >= s3_shape[0] * s3_shape[1] * h * w

    def _dense_instances(self, out: EncoderOutput, row: int, n3: int, h: int, w: int, s2: np.ndarray | None,
                         sup: Any = None) -> list[Instance]:
        """HULK-SMASH on the dense path for batch row ``row``: cropped per-spike supports (``sup``:
        already computed for the row), Conv2 history, tracking."""
        enc, mc, params = self.encoder, self.mc, self._inst_params
        assert enc is not None and params is not None
        if self._inst_state is None:
            self._inst_state = inst.fresh_instance_state(h, w, params)
        if sup is not None:
            supports, classes, skipped = sup
        elif n3:
            supports, classes, skipped = inst.crop_spike_supports(
                out, enc.w1, enc.w2, enc.w3, mc.decoder_gate, mc.decoder_threshold, params.max_spikes, row
            )
        else:
            supports, classes, skipped = inst.empty_supports(), np.zeros(0, np.int64), 0
        if s2 is None:
            # Conv2 spikes as flat channels-last indices (y * W2 + x) * 36 + f, the history's layout
            s2 = torch.nonzero(out.layer_spikes["conv2"][row].permute(1, 2, 0).reshape(-1)).flatten().cpu().numpy()
        self._inst_state.skipped_spikes = skipped
        found, self._inst_state = inst.instances_step(supports, classes, s2, w, self._inst_state, params)
        return list(found)


def build_model_node(
    cfg: Config, size: SensorSize, in_channels: int, device: str | torch.device, weights: str | None = None
) -> ModelNode:
    """What the engine calls to build the model stage (validates only; ``open`` loads)."""
    return ModelNode(cfg, size, in_channels, device, weights)


# --------------------------------------------------------------------------- benchmark
def bench(device: str = "cpu", size: tuple[int, int] = (346, 260), batches: tuple[int, ...] = (1, 16),
          n_steps: int = 300, bin_us: int = 1000, paths: tuple[str, ...] = ("auto",), **model: Any) -> None:
    """Print node steps/s (median of 3 runs over ``n_steps`` steps) on moving shapes.

    Run: ``python -m model.node [cpu|cuda] [WxH] [bin_us] [key=value ...]`` (model config
    overrides, e.g. ``lambda1=3.0 instances=false``).  Input: :func:`benchmarks.inputs.
    fallback_scene_events` (four moving shapes + 0.05 % noise) binned by the real binner;
    each row drives the node with ``process_batch`` in chunks of ``batch`` queued steps, as
    the engine does, and reports mean spikes per layer and instances per step.
    """
    from benchmarks.inputs import bin_steps, fallback_scene_events
    from stream.config import build

    torch.set_num_threads(1)  # as the engine runs the model (stream/engine.py)
    sz = SensorSize(*size)
    steps = bin_steps(fallback_scene_events(sz, n_steps + 20, bin_us), sz, bin_us)[: n_steps + 20]
    if device != "cpu":
        steps = [Step(s.index, s.t0_us, s.t1_us, s.frame.to(device), s.events, s.size, s.closed_ns) for s in steps]
        torch.cuda.synchronize()
    for path in paths:
        mc = build(ModelConfig, {**model, "path": path})
        node = ModelNode(mc, sz, 2, device)
        node.open(None)
        for batch in batches:
            rates = []
            res: list[MaskResult] = []
            for _ in range(4):  # the first run warms up (numba compile, cuDNN autotune)
                node.reset()
                t0 = time.perf_counter()
                res = []
                for i in range(20, len(steps), batch):
                    res += node.process_batch(steps[i : i + batch])
                rates.append(len(res) / (time.perf_counter() - t0))
            spk = {k: float(np.mean([r.layer_spikes[k] for r in res])) for k in ("conv1", "conv2", "conv3")}
            print(f"{device} {sz} bin={bin_us}us path={node.path} batch={batch} {model}: "
                  f"{np.median(rates[1:]):8.0f} steps/s  spikes/step s1={spk['conv1']:.0f} s2={spk['conv2']:.0f} "
                  f"s3={spk['conv3']:.1f} inst/step={np.mean([len(r.instances) for r in res]):.1f}", flush=True)
        node.close()


if __name__ == "__main__":
    import sys

    import yaml

    args = sys.argv[1:]
    dev = args.pop(0) if args and args[0] in ("cpu", "cuda") else "cpu"
    wh = tuple(int(v) for v in args.pop(0).split("x")) if args and "x" in args[0] and "=" not in args[0] else (346, 260)
    bu = int(args.pop(0)) if args and args[0].isdigit() else 1000
    over = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args)}
    cuda_run = dev == "cuda"
    bench(dev, wh, (1, 16, 64) if cuda_run else (1, 16), 400 if cuda_run else 300, bu,
          ("dense",) if cuda_run else ("sparse", "dense"), **over)
