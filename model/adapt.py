"""Online STDP while streaming (``--adapt``), rate-limited so that it never stalls the stream.

The model node calls one hook per step, after the step's mask has been made::

    extra = adapter.after_step(encoder, out, prev_state)   # -> dict for MaskResult.extra

with ``out`` the step's :class:`model.encoder.EncoderOutput` and ``prev_state`` the
:class:`model.encoder.EncoderState` the step started from (``None`` after a reset).  An
update changes ``encoder.w2`` (and ``w3`` with ``layers: [conv2, conv3]``) in place, so the
*next* step's spikes and masks use the new weights; the current mask was already made.

What an update does, per adapted layer L (conv2 reads Pool1, conv3 reads Pool2):

* post: the neurons of L that spiked *this* step (``t_post = t``); their pre-reset membrane
  ``V = leak(V_prev) + I`` is recomputed with the model's own neuron maths (infinite
  threshold probe), so WTA ties go to the larger membrane exactly as in training;
* pre: an input neuron counts as "fired before or with the post spike" (LTP) if it spiked in
  the last ``window_steps`` steps (the training window); otherwise LTD.  Tracking the last
  spike step of each input neuron costs one ``where`` per step;
* winners by :func:`model.learning.wta.select_winners` (mode, radius, max winners and the
  learning rates come from the ``train`` section: one config home), then
  :func:`model.learning.stdp.update_winners`.  Thresholds are not adapted online.

Budget: at most one update every ``every_n_steps`` steps, and only while the time spent in
updates stays under ``max_share`` of wall time (a token bucket: it earns ``max_share`` x
elapsed wall time, an update spends its measured cost; the bucket holds at most
``max_share`` x 1 s, so a burst after a quiet minute stays bounded).  An update is a few
milliseconds at 346x260 (docs/quality.md); skipped updates are simply skipped -- the stream never waits.

Saving (``save_weights``): a snapshot of the weights is written every ``save_every_s``
seconds by a background thread (the model thread only clones three small tensors) and
once more, synchronously, at :meth:`OnlineAdapter.close`.  Files are written to a temporary
name and renamed, so a reader never sees half a checkpoint.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from stream.config import Config, section
from stream.node import NodeError

from .learning.stdp import STDPParams, convergence, receptive_fields, update_winners
from .learning.wta import select_winners_sparse, warm_up
from .encoder import quantize_weights
from .neurons import NeuronParams, NeuronState, neuron_step

ADAPTABLE = ("conv2", "conv3")
_INPUT = {"conv2": "pool1", "conv3": "pool2"}
_PAD = {"conv2": 2, "conv3": 3}
_LAYER_IDX = {"conv2": 1, "conv3": 2}


@section("adapt")
@dataclass(frozen=True)
class AdaptConfig:
    """Online adaptation (off by default).

    ``enabled``: run STDP while streaming.  ``layers``: conv2 and/or conv3.
    ``every_n_steps``: at most one update per this many steps.  ``max_share``: at most this
    share of wall time spent in updates.  ``window_steps``: input spikes this recent count as
    "before" the post spike.  ``save_weights``: checkpoint path written every
    ``save_every_s`` seconds and at exit (None = not saved).
    """

    enabled: bool = False
    layers: tuple[str, ...] = ("conv2",)
    every_n_steps: int = 10
    max_share: float = 0.2
    window_steps: int = 10
    save_weights: str | None = None
    save_every_s: float = 30.0

    def __post_init__(self) -> None:
        bad = [x for x in self.layers if x not in ADAPTABLE]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} is not allowed; use distinct names from {list(ADAPTABLE)}")
        if not 1 <= self.every_n_steps <= 1_000_000:
            raise ValueError(f"every_n_steps={self.every_n_steps} out of range; use 1 .. 1000000")
        if not 0 < self.max_share <= 1:
            raise ValueError(f"max_share={self.max_share} out of range; use 0 < max_share <= 1")
        if not 1 <= self.window_steps <= 10_000:
            raise ValueError(f"window_steps={self.window_steps} out of range; use 1 .. 10000")
        if self.save_weights is not None and not self.save_weights.strip():
            raise ValueError("save_weights is an empty string; give a path or leave it null")
        if not 0.1 <= self.save_every_s <= 86_400:
            raise ValueError(f"save_every_s={self.save_every_s} out of range; use 0.1 .. 86400 seconds")


def spiking_candidates(
    spikes: torch.Tensor, inp: torch.Tensor, w: torch.Tensor, pad: int, prev_v: torch.Tensor | None, params: NeuronParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) of the neurons that spiked and their pre-reset membranes.

    ``spikes`` (C, H, W) this step's spikes of the layer, ``inp`` (C_in, H, W) its input
    spikes, ``w`` (C, C_in, k, k) its weights (stride 1, zero ``pad``), ``prev_v`` (C, H, W)
    the membrane the step started from (None = rest).  For each spiking neuron ``(c, y, x)``::

        I = sum_{ci, i, j} w[c, ci, i, j] * inp_padded[ci, y + i, x + j]     (= conv2d at (y, x))
        V = neuron_step(I, V_prev; params with theta = inf)                    (leak(V_prev) + I)

    Pure; O(K k^2 C_in) for K spiking neurons.  Equal to the full-layer conv2d + neuron step
    read at those positions (exactly so for weights on the 2^-12 grid and binary input).
    """
    flat = torch.nonzero(spikes.flatten()).flatten()  # ascending: the WTA tie-break needs it
    C, H, W = spikes.shape
    c, rem = flat // (H * W), flat % (H * W)
    rf = receptive_fields(inp, rem // W, rem % W, (w.shape[-2], w.shape[-1]), (pad, pad), fill=0.0)
    cur = (rf * w[c]).sum((1, 2, 3))
    prev = None if prev_v is None else NeuronState(prev_v.flatten()[flat], None)
    probe = params._replace(theta=torch.tensor(float("inf"), device=cur.device), fire_once=False)
    _, st = neuron_step(cur, prev, probe)
    return flat, st.v


class OnlineAdapter:
    """Rate-limited online STDP + WTA on a streaming encoder (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.acfg: AdaptConfig = cfg["adapt"]
        tcfg = cfg["train"]
        self.params = STDPParams(tcfg.a_plus, tcfg.a_minus)
        self.wta_mode, self.wta_radius, self.max_winners = tcfg.wta_mode, tcfg.wta_radius, tcfg.max_winners
        self.model_cfg = cfg["model"]
        self.save_path = Path(self.acfg.save_weights) if self.acfg.save_weights else None
        if self.save_path is not None and not self.save_path.parent.exists():
            raise NodeError(f"--save-weights {self.save_path}: folder {self.save_path.parent} does not exist; create it first")
        self.metrics: Any = None
        self.encoder: Any = None
        self.updates = 0
        self.skipped_budget = 0
        self.c_l: dict[str, float] = {}
        self.update_seconds: list[float] = []
        self._saver: threading.Thread | None = None
        self._save_lock = threading.Lock()
        self._save_error: str | None = None
        self.reset()

    # lifecycle --------------------------------------------------------------------------
    def open(self, ctx: Any, encoder: Any) -> None:
        """Bind to the run's metrics (``ctx.metrics``, may be None) and the node's encoder."""
        self.metrics = getattr(ctx, "metrics", None)
        self.encoder = encoder
        now = time.perf_counter()
        self._t_open = self._t_last_save = self._t_bucket = now
        self._bucket = 0.0
        self.c_l = {layer: float(convergence(self._weight(layer))) for layer in self.acfg.layers}
        warm_up()  # compile/load the numba WTA scan now, not inside the first streamed update

    def reset(self) -> None:
        """Forget the input-spike history (stream reset); learned weights are kept."""
        self._t = 0
        self._last_update = -(10**9)
        self._last_pre: dict[str, torch.Tensor] = {}

    def close(self) -> None:
        """Write the final checkpoint (if ``save_weights``) and wait for a pending background save."""
        if self._saver is not None:
            self._saver.join(timeout=30)
        if self.save_path is not None and self.encoder is not None:
            self._write(self._snapshot())
        if self._save_error is not None:
            raise NodeError(self._save_error)

    # per step -----------------------------------------------------------------------------
    def _weight(self, layer: str) -> torch.Tensor:
        return self.encoder.w2 if layer == "conv2" else self.encoder.w3

    def after_step(self, encoder: Any, out: Any, prev_state: Any) -> dict[str, float]:
        """The hook: track input spikes, maybe update, maybe save; returns figures for ``MaskResult.extra``."""
        self.encoder = encoder
        t = self._t
        for layer in self.acfg.layers:
            inp = out.layer_spikes[_INPUT[layer]][0]
            last = self._last_pre.get(layer)
            if last is None or last.shape != inp.shape:
                last = torch.full(inp.shape, -(10**9), dtype=torch.int64, device=inp.device)
            self._last_pre[layer] = last.masked_fill_(inp > 0, t)  # in place: no allocation per step
        self._t += 1
        now = time.perf_counter()
        # token bucket: earn max_share of the elapsed wall time, capped at max_share * 1 s
        share = self.acfg.max_share
        self._bucket = min(self._bucket + share * (now - self._t_bucket), share)
        self._t_bucket = now
        if t - self._last_update >= self.acfg.every_n_steps:
            if self._bucket > 0:
                self._last_update = t
                self._update(encoder, out, prev_state, t)
                cost = time.perf_counter() - now
                self._bucket -= cost
                self.update_seconds.append(cost)
                if len(self.update_seconds) > 10_000:
                    del self.update_seconds[:5_000]
            else:
                self.skipped_budget += 1
        if self.save_path is not None and now - self._t_last_save >= self.acfg.save_every_s:
            self._t_last_save = now
            self._save_async()
        elapsed = max(now - self._t_open, 1e-9)
        extra = {"adapt.updates": float(self.updates), "adapt.updates_per_s": self.updates / elapsed}
        for layer, c in self.c_l.items():
            extra[f"adapt.c_l.{layer}"] = c
        extra["adapt.c_l"] = self.c_l[self.acfg.layers[0]]
        return extra

    def _update(self, encoder: Any, out: Any, prev_state: Any, t: int) -> None:
        """One STDP + WTA update per adapted layer, on the neurons that spiked this step only.

        Cost is O(K) in the K neurons that spiked (plus one O(H W) ``nonzero``), not a
        full-frame convolution: each candidate's current ``I = <W[c], RF(y, x)>`` is gathered
        from its receptive field and its pre-reset membrane ``V = leak(V_prev) + I`` is
        computed by the model's own neuron maths on those K values
        (:func:`spiking_candidates`).  The alternative, a conv2d + neuron step over the whole
        layer plus a Python winner scan, cost ~25 ms per update at 346x260 on one core.
        """
        p_all = encoder.params()
        for layer in self.acfg.layers:
            i = _LAYER_IDX[layer]
            w = self._weight(layer)
            spikes = out.layer_spikes[layer][0]
            prev_v = None if prev_state is None else prev_state.neurons[i].v[0]
            flat, v_pre = spiking_candidates(spikes, out.layer_spikes[_INPUT[layer]][0], w, _PAD[layer], prev_v, p_all[i])
            if flat.numel() == 0:
                continue
            C, H, W = spikes.shape
            pad = _PAD[layer]
            times = torch.full_like(v_pre, float(t))  # all candidates spiked this step
            won = select_winners_sparse(flat, times, v_pre, (C, H, W), self.wta_mode, self.wta_radius, self.max_winners)
            if won.index.numel() == 0:
                continue
            recent = (t - self._last_pre[layer]) < self.acfg.window_steps
            pre_t = torch.where(recent, float(t), float("inf"))
            new = update_winners(w, pre_t, won.index, won.time, self.params, (pad, pad))
            with torch.no_grad():
                # back onto the 2^-12 weight grid (model.encoder.quantize_weights: dense, sparse and
                # CUDA paths stay bit-identical only for weights on it)
                w.copy_(quantize_weights(new))
            self.updates += 1
            self.c_l[layer] = float(convergence(w))
            if self.metrics is not None:
                self.metrics.inc("adapt.updates")
                self.metrics.gauge("adapt.c_l" if layer == self.acfg.layers[0] else f"adapt.c_l.{layer}", self.c_l[layer])

    # saving -----------------------------------------------------------------------------
    def _snapshot(self) -> SimpleNamespace:
        e = self.encoder
        return SimpleNamespace(
            w1=e.w1.detach().clone(), w2=e.w2.detach().clone(), w3=e.w3.detach().clone(),
            theta1=e.theta1.detach().clone(), theta2=e.theta2.detach().clone(), theta3=e.theta3.detach().clone(),
            cfg=e.cfg, updates=self.updates,
        )

    def _write(self, snap: SimpleNamespace) -> None:
        from .checkpoint import save_checkpoint

        assert self.save_path is not None
        meta = {"trained": True, "adapted": True, "updates": snap.updates, "layers": list(self.acfg.layers),
                "note": "online STDP adaptation (model/adapt.py)"}
        with self._save_lock:
            tmp = self.save_path.with_name(self.save_path.name + ".tmp")
            try:
                save_checkpoint(tmp, snap, meta)  # duck-typed: only the attributes above are read
                tmp.replace(self.save_path)
            except OSError as e:
                self._save_error = f"--save-weights {self.save_path}: cannot write ({e.strerror}); check the path and free space"

    def _save_async(self) -> None:
        if self._saver is not None and self._saver.is_alive():
            return  # the previous save is still writing: skip this one rather than queue up
        snap = self._snapshot()
        self._saver = threading.Thread(target=self._write, args=(snap,), name="adapt-save", daemon=True)
        self._saver.start()


def attach(node: Any, cfg: Config, metrics: Any = None) -> OnlineAdapter:
    """The :class:`OnlineAdapter` of an opened :class:`model.node.ModelNode` (for ``run_pipeline(model_hook=...)``).

    The node builds, opens, calls and closes its adapter itself when ``adapt.enabled`` is set
    (``--adapt``); this only hands it out, so tests and tools can read its counters.  Raises
    NodeError when the node runs without one.
    """
    ad = getattr(node, "adapter", None)
    if ad is None:
        raise NodeError("the model node runs no online adapter; set adapt.enabled: true (--adapt) in the config")
    return ad
