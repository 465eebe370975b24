"""Same-process A/B of the dense model path on CPU (the one ``--adapt`` runs): the joint mask by
per-spike crops only (``dense_decode="crops"``, the CPU choice before the tenth pass) against
the per-step choice (``"auto"``: crops or one full-frame decode, whichever costs less for the
step's Conv3 spikes, ``model.node.CROP_PIXELS_PER_SPIKE``).

Both nodes get the same steps of the built-in scene (1 ms bins, instances on, one step at a
time as with ``--adapt``).  Before timing, one run of each must give identical masks, spike
counts and instances.  Then the two take turns, ``--rounds`` times, alternating which goes
first (this VM's speed drifts, see benchmarks/README.md).  Prints each one's median steps/s and
the median and range of the per-round ratios.

Run: ``python -m benchmarks.ab_dense_cpu [--sizes 64x64,346x260] [--steps 40] [--rounds 5]``.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np
import torch

from benchmarks import inputs
from benchmarks.bench_model import model_config
from stream.events import SensorSize
from stream.metrics import Metrics
from stream.node import RunContext

WARM_STEPS = 100  # the scene's first steps, before Conv2/Conv3 reach their steady activity


def compare(size: SensorSize, n_steps: int, rounds: int) -> dict[str, float]:
    """Median steps/s of both decoders at ``size`` and the per-round ratios (auto / crops)."""
    from model.node import ModelNode

    cfg = model_config(path="dense")
    ev, _ = inputs.scene_events(cfg, size, WARM_STEPS + n_steps)
    steps = inputs.bin_steps(ev, size)[WARM_STEPS : WARM_STEPS + n_steps]
    nodes = {}
    for decode in ("crops", "auto"):
        node = ModelNode(cfg["model"], size, cfg["binner"].channels, "cpu", batch_mode="steps", dense_decode=decode)
        node.open(RunContext(stop=threading.Event(), metrics=Metrics()))
        nodes[decode] = node
    try:
        seen = {}
        for decode, node in nodes.items():
            node.reset()
            seen[decode] = [(r.mask.tobytes(), r.layer_spikes, r.instances) for r in node.process_batch(steps)]
        if seen["crops"] != seen["auto"]:
            raise SystemExit(f"{size}: the two decoders gave different results; not timing them")
        times: dict[str, list[float]] = {d: [] for d in nodes}
        for r in range(rounds):
            for decode in ("crops", "auto") if r % 2 else ("auto", "crops"):
                node = nodes[decode]
                node.reset()
                t0 = time.perf_counter()
                node.process_batch(steps)
                times[decode].append(len(steps) / (time.perf_counter() - t0))
    finally:
        for node in nodes.values():
            node.close()
    ratios = [a / c for a, c in zip(times["auto"], times["crops"])]
    return {
        "conv3_per_step": float(np.mean([s[1]["conv3"] for s in seen["auto"]])),
        "crops": float(np.median(times["crops"])), "auto": float(np.median(times["auto"])),
        "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_dense_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64x64,346x260", help="comma-separated WIDTHxHEIGHT (default 64x64,346x260)")
    ap.add_argument("--steps", type=int, default=40, help="steps per timed run (default 40)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.rounds < 1 or a.threads < 1:
        raise SystemExit("--steps, --rounds and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    for text in a.sizes.split(","):
        try:
            size = inputs.parse_size(text.strip())
        except ValueError as e:
            raise SystemExit(f"--sizes: {e}") from None
        r = compare(size, a.steps, a.rounds)
        print(f"{size.width}x{size.height} scene, {r['conv3_per_step']:.0f} Conv3 spikes/step, instances on: "
              f"crops {r['crops']:.1f} steps/s, per-step choice {r['auto']:.1f} steps/s, ratio {r['ratio']:.2f} "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}), identical results", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
