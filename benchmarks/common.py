"""Timing harness and result rows shared by every benchmark.

Every figure is a rate measured ``repeats`` times after ``warmup`` untimed runs; a row
keeps the median, min and max (PERF-NOTES: machines here are noisy, ±20 %, so one
number alone would mislead).  Rates, not times, so that "higher is better" holds for
every row except latencies, which carry ``higher_better=False``.

Decision: ``time.perf_counter`` around whole blocks of work (many steps or millions of
events), not per-call timers: a per-call timer costs about a microsecond, which is
visible at 10,000 steps/s.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class BenchSettings:
    """How hard to measure.  ``tiny`` shrinks every benchmark to run once, fast (tests)."""

    repeats: int = 5
    warmup: int = 1
    tiny: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} is not allowed; use >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} is not allowed; use >= 0")


@dataclass(frozen=True)
class Stat:
    """Median, min and max of ``n`` measurements of one figure, in ``unit``."""

    median: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: list[float]) -> "Stat":
        if not values:
            return Stat(math.nan, math.nan, math.nan, 0)
        return Stat(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))


def measure_rate(work: Callable[[], float], settings: BenchSettings, setup: Callable[[], object] | None = None) -> Stat:
    """Call ``work()`` (returns the amount of work done: events, steps) warm-up + repeat times.

    Returns the rate ``amount / seconds`` over the timed calls.  ``setup()``, when given, runs
    before every call and outside the timing (a model's state reset: a streaming rate, not
    the cost of starting a stream; on a 51-step recording at 640x480 the reset was ~10 %).
    """
    for _ in range(settings.warmup):
        if setup is not None:
            setup()
        work()
    rates = []
    for _ in range(settings.repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        amount = work()
        dt = time.perf_counter() - t0
        rates.append(amount / dt if dt > 0 else math.inf)
    return Stat.of(rates)


@dataclass
class Row:
    """One line of the table.

    ``target`` is a human-readable goal (">= 2000"), ``target_value`` the number it is
    checked against (median vs target); ``met`` is None when the row has no target.
    ``extra`` carries whatever explains the figure (spike counts, peer status, notes).
    """

    section: str
    name: str
    stat: Stat
    unit: str
    target: str = ""
    target_value: float | None = None
    higher_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target_value is None or math.isnan(self.stat.median):
            return None
        if self.higher_better:
            return self.stat.median >= self.target_value
        return self.stat.median <= self.target_value

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["met"] = self.met
        return d


@dataclass
class Skip:
    """A benchmark (or peer) that did not run, and why (reported, never silent)."""

    section: str
    name: str
    reason: str


@dataclass
class Results:
    """All rows of one run, plus skips and notes; written as table, JSON and PNG."""

    settings: BenchSettings
    rows: list[Row] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def skip(self, section: str, name: str, reason: str) -> None:
        self.skips.append(Skip(section, name, reason))

    def find(self, section: str, name: str) -> Row | None:
        for r in self.rows:
            if r.section == section and r.name == name:
                return r
        return None

    def meta(self) -> dict[str, Any]:
        return {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "settings": asdict(self.settings),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "spikestream.bench.v1",
            "meta": self.meta(),
            "rows": [r.to_json() for r in self.rows],
            "skips": [asdict(s) for s in self.skips],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """Fixed-width text table: section, name, median [min..max] unit, target, status."""
        lines = []
        head = f"{'':2} {'benchmark':<52} {'median':>12} {'min':>10} {'max':>10}  {'unit':<10} {'target':<10} status"
        lines.append(head)
        lines.append("-" * len(head))
        section = None
        for r in self.rows:
            if r.section != section:
                section = r.section
                lines.append(f"[{section}]")
            met = r.met
            status = "" if met is None else ("met" if met else "MISSED")
            s = r.stat
            lines.append(
                f"{'':2} {r.name[:52]:<52} {_fmt(s.median):>12} {_fmt(s.min):>10} {_fmt(s.max):>10}  "
                f"{r.unit:<10} {r.target:<10} {status}"
            )
        for sk in self.skips:
            lines.append(f"   SKIPPED [{sk.section}] {sk.name}: {sk.reason}")
        for n in self.notes:
            lines.append(f"   note: {n}")
        return "\n".join(lines)

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write ``bench.json``, ``bench.txt`` and ``bench.png`` into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "bench.json", "txt": out_dir / "bench.txt", "png": out_dir / "bench.png"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, default=_json_default), encoding="utf-8")
        paths["txt"].write_text(self.table() + "\n", encoding="utf-8")
        plot(self, paths["png"])
        return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def plot(results: Results, path: Path) -> None:
    """Horizontal bar chart, one panel per unit (log x), whiskers from min to max, target ticks."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; the alternative (default backend) fails headless
    import matplotlib.pyplot as plt

    by_unit: dict[str, list[Row]] = {}
    for r in results.rows:
        if not math.isnan(r.stat.median) and r.stat.median > 0:
            by_unit.setdefault(r.unit, []).append(r)
    n = max(1, len(by_unit))
    heights = [max(1.5, 0.28 * len(rows) + 0.8) for rows in by_unit.values()] or [2.0]
    fig, axes = plt.subplots(n, 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (unit, rows) in zip(axes[:, 0], by_unit.items()):
        y = list(range(len(rows)))
        med = [r.stat.median for r in rows]
        lo = [max(r.stat.median - r.stat.min, 0) for r in rows]
        hi = [max(r.stat.max - r.stat.median, 0) for r in rows]
        colors = ["tab:green" if r.met else ("tab:red" if r.met is False else "tab:blue") for r in rows]
        ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=2)
        for i, r in enumerate(rows):
            if r.target_value is not None:
                ax.plot([r.target_value, r.target_value], [i - 0.4, i + 0.4], color="black", lw=1.5)
        ax.set_yticks(y)
        ax.set_yticklabels([f"[{r.section}] {r.name}"[:60] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title("SpikeStream benchmarks: median, min-max whiskers; black tick = target (green met, red missed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
