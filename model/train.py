"""``python run.py train``: unsupervised layer-wise STDP + WTA training of SpikeSEG.

Flow (seed 003's training guide): Conv1 is fixed (DoG/Gabor, never trained); Conv2 is
trained with STDP + winner-take-all until it converges, then Conv3.  Per sample (a window
of ``window_steps`` time bins, reset state at its start)::

    run Conv1 -> Pool1 (-> Conv2 -> Pool2) with the current weights; for the trained layer
    record per neuron its first spike time t_post and pre-reset membrane at that spike,
    and per input neuron its first spike time t_pre (inf = never)
    winners = WTA(t_post, v_pre; mode, radius)                       (model/learning/wta.py)
    W[c]   += STDP(W[c], t_pre(receptive field of the winner) <= t_post)   (stdp.py)
    θ[c]    = homeostasis(θ, won)                                      (homeostasis.py)

The trained layer fires at ``θ_layer · θ_h[c]`` (adaptive thresholds); the layers below use
the model's own neuron maths (model/neurons.py) exactly as at inference.  A layer stops at
``C_l = mean(w (1 − w)) < converge_c``, or when ``stop_ratio`` of its maps have their own
``C < map_converge_c``, or after ``--epochs`` epochs.

Samples are computed ``batch`` at a time with the weights of the batch start, then the
updates are applied sample by sample (each from the then-current weights).  The
alternative -- one forward per sample -- is exact but ~batch times slower on 2 cores; the
staleness is at most ``batch`` updates of ``a⁺/4`` each per weight.

Data: ``--source`` as in the pipeline (``synthetic``: the built-in scenes with training seeds
``< 1000``; or .aedat4 files/globs).  Streams are binned with :class:`stream.binner.Binner`
and cut into windows of ``window_steps`` bins, cropped to ``crop x crop`` pixels around the
window's events (weights are convolutions, hence size-independent, so training at 128x128 is
~7x cheaper than at 346x260 and the checkpoint runs at any size).

Outputs under ``--output/--name``: ``checkpoints/checkpoint_epoch{N}_{layer}.pt``,
``checkpoint_epoch0_init.pt`` (the untrained init), ``checkpoint_best.pt`` (the best validation
score, init included, see :func:`validation_score`; with ``select_by: c_l`` :func:`_best_key`), ``checkpoint_latest.pt``, ``metrics_final.json``,
``logs/train_*.log``, ``plots/*.png``.  Ctrl-C saves ``checkpoint_latest.pt`` and the metrics;
``--resume`` continues from a checkpoint's training state (layer, epoch count, thresholds).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stream.config import Config, section
from stream.node import NodeError, RunContext, UsageError

from .learning import homeostasis as homeo
from .learning.stdp import STDPParams, check_params, convergence, converged_ratio, map_convergence, update_winners
from .learning.wta import MODES, select_winners
from .encoder import quantize_weights
from .neurons import NeuronParams, NeuronState, neuron_step

log = logging.getLogger("spikestream.train")

TRAINABLE = ("conv2", "conv3")
#: Highest synthetic seed used for training; ``sources.synthetic.benchmark_scenes`` holds out seeds >= 1000.
HELD_OUT_SEED = 1000
INF = float("inf")


@section("train")
@dataclass(frozen=True)
class TrainConfig:
    """Layer-wise STDP training (``python run.py train``).

    Data: ``window_steps`` bins per sample, ``samples_per_epoch`` windows (the same windows
    every epoch), ``crop`` px square training resolution, ``min_events`` per window (quieter
    windows are skipped), ``scenes`` synthetic training scenes (seeds ``scene_seed0 ..``,
    all ``< 1000``), ``window_gap`` windows skipped between two samples of one input (so
    samples are not near-copies), ``batch`` samples per forward pass.
    STDP: ``a_plus``, ``a_minus`` (the preset sets them: igarss2023 0.04/0.03,
    kheradpisheh2018 0.004/0.003).  WTA: ``wta_mode`` (global|local|both), ``wta_radius``
    (px of the trained layer), ``max_winners`` per sample.
    Homeostasis (thresholds as multiples of the layer threshold, time in samples):
    ``homeostasis`` on/off, ``theta_plus`` 0.05, ``tau_theta`` 50, ``theta_max`` 2.0,
    ``theta_min`` 0.5, ``dead_after`` 20, ``dead_step`` 0.05 (rest is 1.0).
    Stopping: ``converge_c`` (C_l), ``map_converge_c`` and ``stop_ratio`` (share of converged
    maps), ``epochs`` (max per layer; ``--epochs`` overrides).  ``layers``: which to train.
    Selection: ``select_by`` "val_iou" scores the untrained init and every epoch's weights on
    validation scenes (``val_scenes``: ``scene[:jitter_px]`` -- the benchmark's kinds, seeds ``val_seed0 ..``, all < 1000, never the
    benchmark's, full sensor size, first ``val_duration_s`` s, the run's inference config) and
    keeps the best as ``checkpoint_best.pt`` -- which may be the init: then training did not
    help and the metrics say so.  "c_l" keeps the old rule (latest layer, lowest C_l).
    """

    epochs: int = 50
    window_steps: int = 10
    samples_per_epoch: int = 64
    crop: int = 128
    min_events: int = 200
    scenes: int = 8
    scene_seed0: int = 0
    window_gap: int = 4
    batch: int = 8
    a_plus: float = 0.04
    a_minus: float = 0.03
    wta_mode: Literal["global", "local", "both"] = "both"
    wta_radius: int = 2
    max_winners: int = 36
    homeostasis: bool = True
    theta_plus: float = 0.05
    tau_theta: float = 50.0
    theta_max: float = 2.0
    theta_min: float = 0.5
    dead_after: int = 20
    dead_step: float = 0.05
    converge_c: float = 0.01
    map_converge_c: float = 0.01
    stop_ratio: float = 0.9
    layers: tuple[str, ...] = TRAINABLE
    select_by: Literal["val_iou", "c_l"] = "val_iou"
    val_scenes: tuple[str, ...] = ("satellites", "satellites:1.5", "shapes", "shapes:1.0", "digits", "mixed")
    val_seed0: int = 900
    val_duration_s: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 100_000:
            raise ValueError(f"epochs={self.epochs} out of range; use 1 .. 100000")
        if not 1 <= self.window_steps <= 1000:
            raise ValueError(f"window_steps={self.window_steps} out of range; use 1 .. 1000 bins")
        if not 1 <= self.samples_per_epoch <= 100_000:
            raise ValueError(f"samples_per_epoch={self.samples_per_epoch} out of range; use 1 .. 100000")
        if not 16 <= self.crop <= 4096:
            raise ValueError(f"crop={self.crop} out of range; use 16 .. 4096 px")
        if self.min_events < 0:
            raise ValueError(f"min_events={self.min_events} must be >= 0")
        if self.scenes < 1 or self.scene_seed0 < 0 or self.scene_seed0 + self.scenes > HELD_OUT_SEED:
            raise ValueError(
                f"training scenes use seeds {self.scene_seed0} .. {self.scene_seed0 + self.scenes - 1}; "
                f"they must lie in 0 .. {HELD_OUT_SEED - 1} (seeds >= {HELD_OUT_SEED} are held out for benchmarks)"
            )
        if not 0 <= self.window_gap <= 10_000:
            raise ValueError(f"window_gap={self.window_gap} out of range; use 0 .. 10000 windows")
        if not 1 <= self.batch <= 1024:
            raise ValueError(f"batch={self.batch} out of range; use 1 .. 1024")
        check_params(STDPParams(self.a_plus, self.a_minus))
        if self.wta_mode not in MODES:
            raise ValueError(f"wta_mode={self.wta_mode!r} is not allowed; use one of {', '.join(MODES)}")
        if not 0 <= self.wta_radius <= 64:
            raise ValueError(f"wta_radius={self.wta_radius} out of range; use 0 .. 64 px")
        if self.max_winners < 1:
            raise ValueError(f"max_winners={self.max_winners} must be >= 1")
        homeo.check_params(self.homeostasis_params())
        for name in ("converge_c", "map_converge_c"):
            v = getattr(self, name)
            if not 0 < v <= 0.25:
                raise ValueError(f"{name}={v} out of range; use 0 < {name} <= 0.25 (C_l lies in [0, 0.25])")
        if not 0 < self.stop_ratio <= 1:
            raise ValueError(f"stop_ratio={self.stop_ratio} out of range; use 0 < stop_ratio <= 1")
        if not self.val_scenes or self.val_seed0 < 0 or self.val_seed0 + len(self.val_scenes) > HELD_OUT_SEED:
            raise ValueError(
                f"validation scenes use seeds {self.val_seed0} .. {self.val_seed0 + len(self.val_scenes) - 1}; "
                f"they must lie in 0 .. {HELD_OUT_SEED - 1} (seeds >= {HELD_OUT_SEED} are the benchmark's)"
            )
        for spec in self.val_scenes:
            scene, _, jit = spec.partition(":")
            try:
                ok = scene in ("satellites", "shapes", "digits", "mixed", "noise") and 0 <= float(jit or 0) <= 20
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"val_scenes entry {spec!r} is not allowed; use SCENE or SCENE:JITTER_PX "
                                 "(satellites, shapes, digits, mixed, noise; jitter 0..20 px)")
        if not 0.01 <= self.val_duration_s <= 60:
            raise ValueError(f"val_duration_s={self.val_duration_s} out of range; use 0.01 .. 60 seconds")
        bad = [x for x in self.layers if x not in TRAINABLE]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} is not allowed; use distinct names from {list(TRAINABLE)}")

    def stdp(self) -> STDPParams:
        return STDPParams(self.a_plus, self.a_minus)

    def homeostasis_params(self) -> homeo.HomeostasisParams:
        return homeo.HomeostasisParams(
            theta_rest=1.0,
            theta_plus=self.theta_plus if self.homeostasis else 0.0,
            tau_theta=self.tau_theta,
            theta_max=self.theta_max,
            theta_min=self.theta_min,
            dead_after=self.dead_after,
            dead_step=self.dead_step if self.homeostasis else 0.0,
        )


# ---------------------------------------------------------------------------------------
# Pure parts: one sample window through the network, recording what STDP needs.
# ---------------------------------------------------------------------------------------
class LayerTrace(NamedTuple):
    """What one window tells STDP about the trained layer (batch-first).

    ``pre_times`` (B, C_in, h, w): first spike step of the layer's input (Pool output), inf = never.
    ``post_times`` (B, C_out, h, w): first spike step of the layer, inf = never.
    ``post_membrane`` (B, C_out, h, w): pre-reset membrane at that first spike (0 where none).
    ``spikes`` (B, C_out): spike counts per map over the window.
    """

    pre_times: Tensor
    post_times: Tensor
    post_membrane: Tensor
    spikes: Tensor


def trace_layer(encoder: Any, frames: Tensor, layer: str, theta_scale: Tensor | None = None) -> LayerTrace:
    """Run ``frames`` (T, B, C, H, W) from a fresh state and trace ``layer`` (conv2 | conv3).

    The trained layer integrates exactly as the model's neuron of that layer (its own leak
    maths, called with an infinite threshold to read the pre-reset membrane ``V``), then
    fires at ``S = V >= θ · θ_scale`` and resets to 0.  Later spikes of a neuron do not
    matter for STDP, so fire-once is not applied to the trained layer.
    """
    if layer not in TRAINABLE:
        raise ValueError(f"layer {layer!r} is not trainable; use one of {', '.join(TRAINABLE)}")
    p1, p2, p3 = encoder.params()
    w1, w2, w3 = encoder.w1, encoder.w2, encoder.w3
    p_tr = p2 if layer == "conv2" else p3
    theta = p_tr.theta if theta_scale is None else p_tr.theta * theta_scale.view(-1, 1, 1)
    probe = p_tr._replace(theta=torch.tensor(INF, device=frames.device), fire_once=False)
    n1 = n2 = None
    n_tr: NeuronState | None = None
    pre_t = post_t = post_v = count = None
    for t in range(frames.shape[0]):
        x = encoder.prepare_input(frames[t])
        s1, n1 = neuron_step(F.conv2d(x, w1, padding=2), n1, p1)
        inp = F.max_pool2d(s1, 2, stride=2)
        if layer == "conv2":
            cur = F.conv2d(inp, w2, padding=2)
        else:
            s2, n2 = neuron_step(F.conv2d(inp, w2, padding=2), n2, p2)
            inp = F.max_pool2d(s2, 2, stride=2)
            cur = F.conv2d(inp, w3, padding=3)
        _, st = neuron_step(cur, n_tr, probe)
        v = st.v
        spk = v >= theta
        if pre_t is None:
            pre_t = torch.full_like(inp, INF)
            post_t = torch.full_like(v, INF)
            post_v = torch.zeros_like(v)
            count = torch.zeros(v.shape[:2], device=v.device)
        pre_t = torch.where(torch.isinf(pre_t) & (inp > 0), float(t), pre_t)
        first = spk & torch.isinf(post_t)
        post_t = torch.where(first, float(t), post_t)
        post_v = torch.where(first, v, post_v)
        count = count + spk.sum((2, 3))
        n_tr = NeuronState(v.masked_fill(spk, 0.0), None)
    assert pre_t is not None and post_t is not None and post_v is not None and count is not None  # T >= 1
    return LayerTrace(pre_t, post_t, post_v, count)


def layer_weight(encoder: Any, layer: str) -> torch.nn.Parameter:
    return encoder.w2 if layer == "conv2" else encoder.w3


def layer_padding(layer: str) -> tuple[int, int]:
    return (2, 2) if layer == "conv2" else (3, 3)


def train_batch(
    encoder: Any, frames: Tensor, layer: str, tcfg: TrainConfig, h_state: homeo.HomeostasisState
) -> tuple[homeo.HomeostasisState, Tensor, Tensor]:
    """One batch of samples: forward, then per sample WTA + STDP (in place on the layer's weight).

    Returns (new homeostasis state, wins per map (C_out,), spikes per map (C_out,)).
    """
    weight = layer_weight(encoder, layer)
    scale = h_state.theta if tcfg.homeostasis else None
    tr = trace_layer(encoder, frames, layer, scale)
    params, hp = tcfg.stdp(), tcfg.homeostasis_params()
    wins = torch.zeros(weight.shape[0])
    w = weight.detach().clone()
    for b in range(frames.shape[1]):
        won = select_winners(tr.post_times[b], tr.post_membrane[b], tcfg.wta_mode, tcfg.wta_radius, tcfg.max_winners)
        w = update_winners(w, tr.pre_times[b], won.index, won.time, params, layer_padding(layer))
        active = torch.zeros(weight.shape[0], dtype=torch.bool)
        if won.index.numel():
            active[won.index[:, 0]] = True
            wins.index_add_(0, won.index[:, 0], torch.ones(won.index.shape[0]))
        if tcfg.homeostasis:
            h_state = homeo.update(h_state, active, hp)
    with torch.no_grad():
        # samples update in float; the batch result goes back onto the 2^-12 weight grid that
        # every inference path relies on for bit-identical sums (model.encoder.quantize_weights)
        weight.copy_(quantize_weights(w))
    return h_state, wins, tr.spikes.sum(0)


# ---------------------------------------------------------------------------------------
# Data: windows of binned events from any registered source.
# ---------------------------------------------------------------------------------------
def _crop_window(frames: np.ndarray, crop: int) -> np.ndarray:
    """Crop (T, C, H, W) to (T, C, crop, crop) centred on the events' centroid (zero-padded if smaller)."""
    T, C, H, W = frames.shape
    if H < crop or W < crop:
        out = np.zeros((T, C, max(H, crop), max(W, crop)), dtype=frames.dtype)
        out[:, :, :H, :W] = frames
        frames, H, W = out, out.shape[2], out.shape[3]
    act = frames.sum((0, 1))
    ys, xs = np.nonzero(act)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (H // 2, W // 2)
    y0 = min(max(cy - crop // 2, 0), H - crop)
    x0 = min(max(cx - crop // 2, 0), W - crop)
    return frames[:, :, y0 : y0 + crop, x0 : x0 + crop]


def iter_windows(source: Any, cfg: Config, window: int, crop: int, stop: Any = None) -> Iterator[np.ndarray]:
    """Yield (T, C, crop, crop) uint8 count windows (and their event totals are >= 0) from ``source``.

    The source is opened and closed here; bins come from :class:`stream.binner.Binner`.
    A :class:`StreamReset` starts a new window (no window spans a cut).
    """
    import threading

    from stream.binner import Binner
    from stream.events import Step
    from stream.metrics import Metrics

    ctx = RunContext(stop=stop or threading.Event(), metrics=Metrics())
    source.open(ctx)
    try:
        binner = Binner(cfg["binner"], source.size, "cpu", source.describe())
        buf: list[np.ndarray] = []
        for item in source.packets():
            for out in binner.process(item):
                if not isinstance(out, Step):
                    buf = []
                    continue
                buf.append(out.frame.numpy().clip(0, 255).astype(np.uint8))
                if len(buf) == window:
                    yield _crop_window(np.stack(buf), crop)
                    buf = []
            if ctx.stop.is_set():
                return
    finally:
        source.close()


def _source_specs(spec: str) -> list[str]:
    """Expand a comma-separated list of sources; globs are expanded to their files (sorted)."""
    out: list[str] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if any(ch in part for ch in "*?[") and not part.startswith("synthetic"):
            files = sorted(glob.glob(part))
            if not files:
                raise UsageError(f"--source {part!r} matches no files; check the glob or pass a path")
            out.extend(files)
        else:
            out.append(part)
    if not out:
        raise UsageError("--source is empty; use 'synthetic' or .aedat4 files")
    return out


def synthetic_configs(cfg: Config, tcfg: TrainConfig) -> list[Config]:
    """One config per training scene: seeds ``scene_seed0 ..`` (< 1000), at ``crop x crop`` px."""
    out = []
    for k in range(tcfg.scenes):
        seed = tcfg.scene_seed0 + k
        out.append(_synthetic_cfg(cfg, seed, tcfg.crop))
    return out


def _synthetic_cfg(cfg: Config, seed: int, size: int) -> Config:
    sec = cfg["synthetic"]
    changes: dict[str, Any] = {"seed": seed}
    names = set(getattr(sec, "__dataclass_fields__", {}))
    if "width" in names and "height" in names:
        changes.update(width=size, height=size)
    return cfg.replace("synthetic", **changes)


def collect_samples(spec: str, cfg: Config, tcfg: TrainConfig, seed: int) -> Tensor:
    """``samples_per_epoch`` windows (N, T, C, crop, crop) uint8 from ``spec``, taken round-robin over inputs.

    Windows with fewer than ``min_events`` events are skipped.  Raises NodeError when the
    input holds too few usable windows.
    """
    from stream.registry import build_source

    n = tcfg.samples_per_epoch
    specs = _source_specs(spec)
    cfgs: list[tuple[str, Config]] = []
    for s in specs:
        if s == "synthetic":
            cfgs.extend(("synthetic", c) for c in synthetic_configs(cfg, tcfg))
        else:
            cfgs.append((s, cfg))
    per_input = math.ceil(n / len(cfgs))
    windows: list[np.ndarray] = []
    for s, c in cfgs:
        got, skip = 0, 0
        for win in iter_windows(build_source(s, c), c, tcfg.window_steps, tcfg.crop):
            if skip > 0 or int(win.sum()) < tcfg.min_events:
                skip -= 1
                continue
            windows.append(win)
            got += 1
            skip = tcfg.window_gap
            if got >= per_input:
                break
    if len(windows) < max(1, n // 4):
        raise NodeError(
            f"--source {spec!r} gave {len(windows)} windows of {tcfg.window_steps} bins with >= {tcfg.min_events} events; "
            f"need {n}: pass longer/more recordings or lower train.min_events"
        )
    g = np.random.default_rng(seed)
    order = g.permutation(len(windows))[:n]
    return torch.from_numpy(np.stack([windows[i] for i in order]))


# ---------------------------------------------------------------------------------------
# The training run: state, checkpoints, metrics, plots, CLI.
# ---------------------------------------------------------------------------------------
def _fresh_state(tcfg: TrainConfig) -> dict[str, Any]:
    return {
        "layer_index": 0,
        "epoch": 0,
        "layer_epoch": 0,
        "done": [],
        "history": {layer: [] for layer in tcfg.layers},
        "homeostasis": {},
        "best": None,
        "stopped_by": {},
    }


def _best_key(layer_index: int, c_l: float) -> tuple[int, float]:
    """Order of checkpoints for ``checkpoint_best.pt``: a later layer beats an earlier one, then lower C_l.

    C_l of different layers are not comparable (Conv3 starts near 0.16 when Conv2 ends near
    0.01), so "lowest C_l" is taken within the latest layer trained.
    """
    return (layer_index, -c_l)


def validation_score(cfg: Config, tcfg: TrainConfig, weights: str | Path) -> dict[str, float | None]:
    """Event IoU and volume informedness of ``weights`` on the validation scenes (pooled), plus their mean.

    The scenes are the training side of the seed split (``val_seed0 ..`` < 1000), never the
    benchmark's; the pipeline is the real one (``run_pipeline`` with an eval sink), so the
    score is what ``run.py eval`` would report for those scenes.
    """
    import dataclasses

    from sinks.evaluation import EvalConfig, EvalSink
    from sinks.scoring import Confusion
    from stream.engine import run_pipeline
    from stream.registry import build_source

    ecfg = cfg["eval"] if "eval" in cfg else EvalConfig()
    ev, vol = Confusion(), Confusion()
    for k, spec in enumerate(tcfg.val_scenes):
        scene, _, jit = spec.partition(":")
        c = cfg.replace("synthetic", seed=tcfg.val_seed0 + k, scene=scene, jitter_px=float(jit or 0.0),
                        duration_s=max(tcfg.val_duration_s, 0.01))
        c = c.replace("model", instances=False)  # masks only: instances do not change event scores
        c = c.replace("engine", status_s=0)
        sink = EvalSink(dataclasses.replace(ecfg, strip_frames=0))
        summ = run_pipeline(c, build_source("synthetic", c), [sink], weights=str(weights),
                            duration_s=tcfg.val_duration_s)
        if summ.error:
            raise NodeError(f"validation scene {scene} (seed {tcfg.val_seed0 + k}): {summ.error}")
        r = sink.result()["model"]
        ev = ev + Confusion(*(r["event"][x] for x in ("tp", "fp", "fn", "tn")))
        sink.model.flush_cells()
        vol = vol + sink.model.volume
    iou, j = ev.iou, vol.informedness
    score = None if iou is None or j is None else (iou + j) / 2
    return {"event_iou": iou, "informedness": j, "score": score}


def _save(path: Path, encoder: Any, state: dict[str, Any], args_meta: dict[str, Any]) -> None:
    from .checkpoint import save_checkpoint

    meta = {"trained": True, "note": "layer-wise STDP + WTA (model/train.py)", **args_meta, "train_state": state}
    tmp = path.with_suffix(".tmp")
    save_checkpoint(tmp, encoder, meta)
    tmp.replace(path)  # atomic: a Ctrl-C mid-write never leaves a half checkpoint behind


def _weight_stats(w: Tensor) -> dict[str, float]:
    return {
        "mean": float(w.mean()),
        "std": float(w.std()),
        "min": float(w.min()),
        "max": float(w.max()),
        "share_below_0.1": float((w < 0.1).float().mean()),
        "share_above_0.9": float((w > 0.9).float().mean()),
        "c_l": float(convergence(w)),
    }


def _setup_logging(run_dir: Path, level: str) -> Path:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"train_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.log"
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers = [h for h in log.handlers if not isinstance(h, logging.FileHandler)]
    log.addHandler(fh)
    log.setLevel(getattr(logging, level))
    return path


def train_layers(
    encoder: Any,
    samples: Tensor,
    tcfg: TrainConfig,
    state: dict[str, Any],
    ckpt_dir: Path,
    meta: dict[str, Any],
    seed: int,
    device: torch.device,
    progress: bool = True,
    val: Any = None,
) -> dict[str, Any]:
    """Train ``tcfg.layers`` in order from ``state`` (mutated and returned); saves checkpoints per epoch.

    ``val(path) -> {"score", ...}`` (optional) scores a checkpoint on validation scenes; with it
    the best checkpoint is the best-scoring one, else :func:`_best_key` decides.

    KeyboardInterrupt propagates after ``checkpoint_latest.pt`` has been written.
    """
    from tqdm import tqdm

    hp = tcfg.homeostasis_params()
    n = samples.shape[0]
    try:
        while state["layer_index"] < len(tcfg.layers):
            li = state["layer_index"]
            layer = tcfg.layers[li]
            weight = layer_weight(encoder, layer)
            hs = state["homeostasis"].get(layer)
            h_state = (
                homeo.HomeostasisState(torch.tensor(hs["theta"]), torch.tensor(hs["silent"], dtype=torch.long))
                if hs
                else homeo.init_state(weight.shape[0], hp)
            )
            bar = tqdm(
                total=tcfg.epochs, initial=state["layer_epoch"], desc=f"{layer}", unit="epoch", disable=not progress, leave=True
            )
            stopped = "max_epochs"
            while state["layer_epoch"] < tcfg.epochs:
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(seed * 100_003 + state["epoch"])
                order = torch.randperm(n, generator=g)
                wins = torch.zeros(weight.shape[0])
                spikes = torch.zeros(weight.shape[0])
                for b0 in range(0, n, tcfg.batch):
                    idx = order[b0 : b0 + tcfg.batch]
                    frames = samples[idx].to(device=device, dtype=torch.float32).transpose(0, 1)
                    h_state, w_b, s_b = train_batch(encoder, frames, layer, tcfg, h_state)
                    wins += w_b.cpu()
                    spikes += s_b.cpu()
                state["epoch"] += 1
                state["layer_epoch"] += 1
                c_l = float(convergence(weight))
                ratio = float(converged_ratio(weight, tcfg.map_converge_c))
                rec = {
                    "epoch": state["epoch"],
                    "layer_epoch": state["layer_epoch"],
                    "c_l": c_l,
                    "converged_ratio": ratio,
                    "wins": [int(v) for v in wins],
                    "spikes_per_sample": float(spikes.sum()) / n,
                    "theta_scale": [round(float(v), 4) for v in h_state.theta],
                    "seconds": time.perf_counter() - t0,
                }
                state["history"].setdefault(layer, []).append(rec)
                state["homeostasis"][layer] = {"theta": h_state.theta.tolist(), "silent": h_state.silent.tolist()}
                bar.set_postfix(C_l=f"{c_l:.4f}", conv=f"{ratio:.0%}", wins=int(wins.sum()))
                bar.update(1)
                log.info(
                    "epoch %d %s: C_l %.5f, converged maps %.0f%%, wins %d (maps won %d/%d), %.1f spikes/sample, %.2f s",
                    state["epoch"], layer, c_l, 100 * ratio, int(wins.sum()), int((wins > 0).sum()),
                    wins.numel(), rec["spikes_per_sample"], rec["seconds"],
                )
                path = ckpt_dir / f"checkpoint_epoch{state['epoch']}_{layer}.pt"
                _save(path, encoder, state, meta)
                if val is not None:
                    rec["val"] = val(path)
                    log.info("epoch %d %s: validation %s", state["epoch"], layer, rec["val"])
                    key = (rec["val"]["score"] if rec["val"]["score"] is not None else -1.0, 0.0)
                else:
                    key = _best_key(li, c_l)
                if state["best"] is None or tuple(key) > tuple(state["best"]["key"]):
                    state["best"] = {"key": list(key), "epoch": state["epoch"], "layer": layer, "c_l": c_l,
                                     "val": rec.get("val")}
                    _save(path, encoder, state, meta)  # the epoch file carries the same state as best
                    _save(ckpt_dir / "checkpoint_best.pt", encoder, state, meta)
                _save(ckpt_dir / "checkpoint_latest.pt", encoder, state, meta)
                if c_l < tcfg.converge_c:
                    stopped = "c_l"
                    break
                if ratio >= tcfg.stop_ratio:
                    stopped = "converged_ratio"
                    break
            bar.close()
            log.info("%s stopped: %s after %d epochs", layer, stopped, state["layer_epoch"])
            state["stopped_by"][layer] = stopped
            state["done"].append(layer)
            state["layer_index"] += 1
            state["layer_epoch"] = 0
            _save(ckpt_dir / "checkpoint_latest.pt", encoder, state, meta)
    except KeyboardInterrupt:
        _save(ckpt_dir / "checkpoint_latest.pt", encoder, state, meta)
        log.warning("interrupted: saved %s (resume with --resume)", ckpt_dir / "checkpoint_latest.pt")
        raise
    return state


def _tile(kernels: Tensor, grid_cols: int) -> np.ndarray:
    """(N, C, k, k) -> one image: N tiles in a grid, each tile the C channels side by side (1 px gaps)."""
    n, c, k, _ = kernels.shape
    tile_w = c * (k + 1)
    rows = math.ceil(n / grid_cols)
    img = np.full((rows * (k + 1), grid_cols * tile_w), np.nan, dtype=np.float32)
    kn = kernels.detach().cpu().numpy()
    for i in range(n):
        r, q = divmod(i, grid_cols)
        for ch in range(c):
            y, x = r * (k + 1), q * tile_w + ch * (k + 1)
            img[y : y + k, x : x + k] = kn[i, ch]
    return img


def sample_raster(encoder: Any, frames: Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Spike raster of one window (T, C, H, W): per layer (times, neuron indices) of every spike."""
    from .encoder import LAYERS

    out: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in LAYERS}
    state = None
    with torch.no_grad():
        for t in range(frames.shape[0]):
            o, state = encoder.step(encoder.prepare_input(frames[t].float()), state)
            for k in LAYERS:
                nz = torch.nonzero(o.layer_spikes[k].flatten()).flatten().cpu().numpy()
                out[k][0].extend([t] * len(nz))
                out[k][1].extend(nz.tolist())
    return {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in out.items()}


def write_plots(
    plot_dir: Path, encoder: Any, before: dict[str, Tensor], state: dict[str, Any], sample: Tensor, tcfg: TrainConfig
) -> list[Path]:
    """Learned features, weight histograms before/after, a spike raster, and the C_l curves (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    for layer, cols in (("conv2", 6), ("conv3", 1)):
        w = layer_weight(encoder, layer)
        if layer == "conv3":
            w = w.reshape(-1, 1, 7, 7)  # every (class, input map) kernel as its own tile
            cols = 6
        fig, axes = plt.subplots(1, 2, figsize=(12, 6))
        for ax, (title, ww) in zip(axes, (("initial", before[layer]), ("learned", w))):
            ww = ww if layer == "conv2" else ww.reshape(-1, 1, 7, 7)
            im = ax.imshow(_tile(ww, cols), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{layer} {title} ({'map x 4 Conv1 inputs' if layer == 'conv2' else '36 input maps, 7x7'})")
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.7)
        p = plot_dir / f"features_{layer}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, layer in zip(axes, TRAINABLE):
        bins = np.linspace(0, 1, 51)
        ax.hist(before[layer].flatten().cpu().numpy(), bins=bins, alpha=0.6, label="before", log=True)
        ax.hist(layer_weight(encoder, layer).detach().flatten().cpu().numpy(), bins=bins, alpha=0.6, label="after", log=True)
        ax.set_title(f"{layer} weights")
        ax.set_xlabel("w")
        ax.legend()
    fig.tight_layout()
    p = plot_dir / "weights_hist.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    raster = sample_raster(encoder, sample)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for ax, (layer, (ts, ns)) in zip(axes, raster.items()):
        ax.scatter(ts, ns, s=1.5, c="k", marker="|")
        ax.set_ylabel(f"{layer} neuron")
        ax.set_title(f"{layer}: {len(ts)} spikes")
    axes[-1].set_xlabel("time step")
    fig.tight_layout()
    p = plot_dir / "raster_sample.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, hist in state["history"].items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["c_l"] for h in hist], marker="o", label=layer)
    ax.axhline(tcfg.converge_c, ls="--", c="grey", label=f"stop at {tcfg.converge_c}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("C_l = mean(w(1-w))")
    ax.legend()
    fig.tight_layout()
    p = plot_dir / "convergence.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    return paths


def write_metrics(path: Path, encoder: Any, state: dict[str, Any], before: dict[str, Tensor], extra: dict[str, Any]) -> None:
    """metrics_final.json: per layer wins, weight statistics (before/after), convergence; run facts."""
    layers = {}
    for layer in TRAINABLE:
        w = layer_weight(encoder, layer).detach()
        hist = state["history"].get(layer, [])
        total_wins = np.sum([h["wins"] for h in hist], axis=0).tolist() if hist else []
        layers[layer] = {
            "trained": layer in state["done"],
            "epochs": len(hist),
            "stopped_by": state["stopped_by"].get(layer),
            "c_l": float(convergence(w)),
            "c_l_curve": [h["c_l"] for h in hist],
            "val_curve": [h["val"]["score"] for h in hist if "val" in h],
            "converged_ratio": hist[-1]["converged_ratio"] if hist else None,
            "map_c": [round(float(v), 5) for v in map_convergence(w)],
            "wins_per_map": total_wins,
            "weights_before": _weight_stats(before[layer]),
            "weights_after": _weight_stats(w),
            "theta_scale": state["homeostasis"].get(layer, {}).get("theta"),
        }
    doc = {"epochs_total": state["epoch"], "layers": layers, "best": state["best"], "val_init": state.get("val_init"),
           **extra}
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``run.py train`` (seed 003's training guide, plus ``--source``)."""
    p.add_argument("--config", "-c", default=None, help="YAML config file (sections as in configs/default.yaml)")
    p.add_argument("--preset", default=None, help="paper preset: igarss2023 (default) or kheradpisheh2018")
    p.add_argument("--output", "-o", default="./runs", help="output directory (default ./runs)")
    p.add_argument("--name", "-n", default=None, help="experiment name (default: timestamp-preset)")
    p.add_argument("--resume", "-r", default=None, help="checkpoint to resume from (continues its epoch count)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs per layer (default: train.epochs = 50)")
    p.add_argument("--n-classes", type=int, default=None, help="number of output classes (default: model.n_classes = 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=42, help="random seed (sample order; default 42)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--source", default="synthetic", help="training data: synthetic, or .aedat4 files/globs, comma-separated")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def _resolve_resume(path: str) -> Path:
    p = Path(path)
    if p.is_dir():  # a run folder: continue from its latest checkpoint
        p = p / "checkpoints" / "checkpoint_latest.pt"
    if not p.is_file():
        raise UsageError(f"--resume {path}: no checkpoint there; pass a .pt file or a run folder with checkpoints/")
    return p


def main(args: argparse.Namespace) -> int:
    """Run the training; returns the exit code (0 ok, 130 interrupted after saving)."""
    from stream.config import load_config

    from .checkpoint import apply_checkpoint, read_checkpoint
    from .encoder import Encoder

    overrides: dict[str, dict[str, Any]] = {}
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    if args.n_classes is not None:
        overrides.setdefault("model", {})["n_classes"] = args.n_classes
    resume = _resolve_resume(args.resume) if args.resume else None
    cfg = load_config(args.config, args.preset, overrides)
    tcfg: TrainConfig = cfg["train"]
    device = _device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % (2**32))

    if resume is not None and args.name is None:
        run_dir = resume.parent.parent  # continue in the run folder the checkpoint came from
    else:
        name = args.name or f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-train-{cfg.preset}"
        run_dir = Path(args.output) / name
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_path = _setup_logging(run_dir, args.log_level)
    (run_dir / "config.yaml").write_text(cfg.dump(), encoding="utf-8")

    encoder = Encoder(cfg["model"], cfg["binner"].channels).to(device)
    before = {layer: layer_weight(encoder, layer).detach().cpu().clone() for layer in TRAINABLE}
    state = _fresh_state(tcfg)
    if resume is not None:
        ck = read_checkpoint(resume)
        st = ck.metadata.get("train_state")
        if not isinstance(st, dict):
            raise UsageError(f"--resume {resume}: not a training checkpoint (no train_state); pass one from checkpoints/")
        apply_checkpoint(encoder, ck, where=f"checkpoint {resume}")
        state = st
        log.info("resumed from %s at epoch %d (layer %s)", resume, state["epoch"], state["layer_index"])
    meta = {"seed": args.seed, "source": args.source, "preset": cfg.preset, "config_train": dict(vars(tcfg))}
    meta["config_train"]["layers"] = list(tcfg.layers)

    t0 = time.perf_counter()
    samples = collect_samples(args.source, cfg, tcfg, args.seed)
    t_data = time.perf_counter() - t0
    log.info("data: %d windows of %d bins at %dx%d from %s (%.1f s)", samples.shape[0], tcfg.window_steps,
             tcfg.crop, tcfg.crop, args.source, t_data)
    code = 0
    t1 = time.perf_counter()
    val = None
    if tcfg.select_by == "val_iou":
        val_cfg = cfg.replace("engine", device=str(device) if device.type == "cpu" else "cuda")
        val = lambda path: validation_score(val_cfg, tcfg, path)  # noqa: E731
        if state["best"] is None:
            # epoch 0 = the untrained init: training must beat it to become checkpoint_best.pt
            init_path = ckpt_dir / "checkpoint_epoch0_init.pt"
            _save(init_path, encoder, state, {**meta, "init": True})
            v0 = val(init_path)
            log.info("init (epoch 0): validation %s", v0)
            state["best"] = {"key": [v0["score"] if v0["score"] is not None else -1.0, 0.0], "epoch": 0,
                             "layer": None, "c_l": None, "val": v0}
            state["val_init"] = v0
            _save(ckpt_dir / "checkpoint_best.pt", encoder, state, {**meta, "init": True})
    try:
        state = train_layers(encoder, samples, tcfg, state, ckpt_dir, meta, args.seed, device, not args.no_progress, val)
    except KeyboardInterrupt:
        code = 130
    wall = time.perf_counter() - t1
    extra = {"wall_s_train": wall, "wall_s_data": t_data, "interrupted": code != 0, "seed": args.seed,
             "source": args.source, "preset": cfg.preset, "samples": int(samples.shape[0]), "log": str(log_path)}
    write_metrics(run_dir / "metrics_final.json", encoder, state, before, extra)
    write_plots(run_dir / "plots", encoder, before, state, samples[0].to(device), tcfg)
    for layer in TRAINABLE:
        log.info("%s: final C_l %.5f", layer, float(convergence(layer_weight(encoder, layer))))
    log.info("%s in %.1f s; outputs in %s", "interrupted" if code else "done", wall, run_dir)
    print(f"{'interrupted' if code else 'trained'}: {run_dir} ({wall:.1f} s)")
    return code


# ---------------------------------------------------------------------------------------
# Held-out quality: trained vs untrained vs the density baseline, on benchmark scenes.
# ---------------------------------------------------------------------------------------
class ScoreSink:
    """A list-like sink that pools event-wise confusion counts of the model mask and of the
    density-filter baseline (``sinks.scoring.density_filter_mask``: 5x5, >= 4 events) per step.

    Only steps with labels count (every synthetic step has them).
    """

    name = "score"
    queue_policy = "block"
    queue_capacity = 64

    def __init__(self) -> None:
        from sinks.scoring import Confusion

        self.model = Confusion()
        self.baseline = Confusion()
        self.steps = 0
        self.mask_pixels = 0

    def open(self, ctx: Any) -> None:  # noqa: D102 - nothing to acquire
        pass

    def close(self) -> None:  # noqa: D102
        pass

    def wait_ready(self, stop: Any) -> None:  # noqa: D102
        pass

    def process(self, item: Any) -> None:
        from sinks.scoring import density_filter_mask, event_confusion
        from stream.events import MaskResult

        if not isinstance(item, MaskResult) or item.step.labels is None:
            return
        st = item.step
        self.steps += 1
        self.mask_pixels += int(np.count_nonzero(item.mask))
        self.model = self.model + event_confusion(st.events, st.labels, item.mask)
        self.baseline = self.baseline + event_confusion(st.events, st.labels, density_filter_mask(st.events, st.size))


def evaluate(cfg: Config, weights: list[str | None], duration_s: float | None = None) -> dict[str, Any]:
    """Run every benchmark scene (``sources.synthetic.benchmark_scenes()``, seeds >= 1000) through
    :func:`stream.engine.run_pipeline` once per checkpoint in ``weights`` (None = shipped default).

    Returns ``{scene: {label: {iou, precision, recall, ...}}, "pooled": {...}}`` where label is the
    weights path or ``"default"``, plus ``"density_baseline"``; counts pooled over events.
    """
    from sinks.scoring import Confusion
    from sources.synthetic import SyntheticSource, benchmark_scenes
    from stream.engine import run_pipeline

    out: dict[str, Any] = {}
    pooled: dict[str, Any] = {}
    for name, scfg in benchmark_scenes():
        res: dict[str, Any] = {}
        for w in weights:
            sink = ScoreSink()
            summ = run_pipeline(cfg, SyntheticSource(scfg), [sink], weights=w, duration_s=duration_s, run_dir=None)
            if summ.error:
                raise NodeError(f"benchmark {name} with {w}: {summ.error}")
            label = w or "default"
            res[label] = {**sink.model.as_dict(), "steps": sink.steps, "mask_px_per_step": sink.mask_pixels / max(1, sink.steps)}
            pooled[label] = pooled.get(label, Confusion()) + sink.model
            res["density_baseline"] = sink.baseline.as_dict()
        pooled["density_baseline"] = pooled.get("density_baseline", Confusion()) + sink.baseline
        out[name] = res
    out["pooled"] = {k: v.as_dict() for k, v in pooled.items()}
    return out
