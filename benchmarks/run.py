"""``python -m benchmarks.run`` (``make bench``): every benchmark in one run, one table.

Prints the table and writes ``bench.json``, ``bench.txt`` and ``bench.png`` into
``--out`` (default ``bench_results/``, gitignored).  ``--tiny`` runs each benchmark once
on tiny inputs (what ``make test`` does, to keep them from rotting); ``--only`` picks
parts by letter (``--only a,b``).  CUDA rows (g) run when torch sees a GPU.

Parts: a binning, b model (+ profile), c peers, d replay end to end, e live latency,
f online adaptation, g CUDA.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from stream.node import UsageError

from .common import BenchSettings, Results

PARTS = "abcdefg"
DEFAULT_OUT = Path("bench_results")


def _parts(text: str) -> str:
    letters = "".join(ch for ch in text.replace(",", "") if not ch.isspace())
    bad = sorted(set(letters) - set(PARTS))
    if bad or not letters:
        raise UsageError(f"--only {text!r} is not allowed; use letters from {PARTS}, e.g. --only a,b")
    return letters


def run_all(settings: BenchSettings, parts: str = PARTS, log: Callable[[str], None] = print) -> Results:
    """Run the chosen parts and return the results (also what the tests call)."""
    from . import bench_adapt, bench_binning, bench_e2e, bench_model

    results = Results(settings)
    if settings.device == "cpu" and not torch.cuda.is_available():
        pass
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("a", "binning", lambda: bench_binning.run(results, settings)),
        # b and c share the opened model node and the inputs: c runs inside b
        ("b", "model + peers", lambda: bench_model.run(results, settings)),
        ("d", "replay end to end", lambda: bench_e2e.run_replay(results, settings)),
        ("e", "live latency", lambda: bench_e2e.run_live(results, settings)),
        ("f", "online adaptation", lambda: bench_adapt.run(results, settings)),
    ]
    if torch.cuda.is_available():
        steps.append(("g", "CUDA model", lambda: bench_model.run(results, settings, cuda=True)))
    else:
        results.skip("g cuda model", "steps/s", "torch sees no CUDA device")
        steps.append(("g", "CUDA recipe's host ops per step, on CPU", lambda: bench_model.host_ops(results, settings)))
    for letter, name, fn in steps:
        if letter not in parts and not (letter == "b" and "c" in parts):
            continue
        t0 = time.perf_counter()
        log(f"-- {letter}: {name} ...")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken part must not hide the others; reported
            results.skip(letter, name, f"failed: {type(e).__name__}: {e}")
            if settings.tiny:
                raise
            traceback.print_exc()
        log(f"   {letter} done in {time.perf_counter() - t0:.1f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for bench.json/.txt/.png (default bench_results/)")
    ap.add_argument("--tiny", action="store_true", help="each benchmark once on tiny inputs (tests)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median, min, max)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per figure")
    ap.add_argument("--only", default=PARTS, help=f"parts to run, letters from {PARTS}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    try:
        parts = _parts(args.only)
        settings = BenchSettings(repeats=1 if args.tiny else args.repeats, warmup=0 if args.tiny else args.warmup, tiny=args.tiny)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_all(settings, parts)
    paths = results.write(args.out)
    print(results.table())
    print(f"written: {paths['json']}, {paths['txt']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
