"""(f) Online adaptation cost per step (``model/adapt.py``).

The node runs the built-in scene at 346x260 with ``adapt.enabled`` (Conv2, the default
layers) and every update allowed (``every_n_steps: 1``, ``max_share: 1.0``), so the
adapter's own timing of each update (``OnlineAdapter.update_seconds``) is the raw cost of
one STDP + WTA update.  The per-step cost at the default budget is that cost divided by
``every_n_steps`` and capped by ``max_share`` of wall time; both are reported.  Adaptation
runs on the dense path (the event-driven kernels hold copies of the weights), so the
steps/s row of this section is the dense node's, not the default sparse one's.
"""
from __future__ import annotations

import statistics
import time

from stream.events import SensorSize

from . import inputs
from .bench_model import open_node
from .common import BenchSettings, Results, Row, Stat


def run(results: Results, settings: BenchSettings) -> None:
    from stream.config import load_config

    sec = "f online adaptation"
    size = SensorSize(64, 48) if settings.tiny else SensorSize(346, 260)
    n_steps = 8 if settings.tiny else 60
    cfg = load_config(overrides={"adapt": {"enabled": True, "every_n_steps": 1, "max_share": 1.0}})
    ev, _ = inputs.scene_events(cfg, size, n_steps)
    steps = inputs.bin_steps(ev, size)
    node = open_node(cfg, size)
    try:
        t0 = time.perf_counter()
        for s in steps:
            node.process_batch([s])
        wall = time.perf_counter() - t0
        costs = sorted(node.adapter.update_seconds)
    finally:
        node.close()
    if not costs:
        results.skip(sec, "update cost", "no update happened (no Conv2 spikes in the scene)")
        return
    ms = [c * 1e3 for c in costs]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    results.add(Row(sec, f"one Conv2 update @{size}", Stat(statistics.median(ms), ms[0], ms[-1], len(ms)), "ms",
                    extra={"p99_ms": p99, "updates": len(ms)}))
    acfg = load_config()["adapt"]
    per_step = statistics.median(ms) / acfg.every_n_steps
    results.add(Row(sec, f"amortised per step at the default budget (every {acfg.every_n_steps} steps, <= {acfg.max_share:.0%} of wall time)",
                    Stat(per_step, per_step, per_step, 1), "ms"))
    results.add(Row(sec, f"dense node with an update every step @{size}", Stat(len(steps) / wall, len(steps) / wall, len(steps) / wall, 1), "steps/s"))
