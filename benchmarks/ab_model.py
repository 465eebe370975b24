"""Same-process A/B of the model node: the ``model`` package of a git revision against the working tree.

This VM's speed drifts by ±30 % over minutes (other tenants' memory traffic), so two versions run
in separate processes, or one after the other, cannot resolve a 5 % change: the same code's runs
spread 0.7-2x in the seventh pass (benchmarks/README.md).  Here both versions live in one process
and take turns: short runs of ``--steps`` steps, each node fed like the engine feeds it
(micro-batches of ``engine.max_batch``, ``more`` set while steps are queued, results dropped, a
node reset before each run as in ``make bench``), alternating which goes first, ``--rounds``
times.  Before timing, one run of each must give identical results (masks, spike counts,
instances and ids); the report is each version's median steps/s and the median and range of the
per-round ratios.

The revision's package is extracted with ``git archive`` into a temporary directory and imported
as ``model_rev``.  Config sections can be registered once per process, so the modules that
register them (``config``, ``adapt``, ``train``) must be identical in both versions and are
shared; the other unchanged modules are shared too.

Run: ``python -m benchmarks.ab_model REV [--rounds 14] [--overlap] [--input scene|noise:0.01]
[--size 346x260] [--steps 400]``.  The first run compiles the revision's numba kernels (a minute
or two; they are cached in the temporary directory only for this run).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
#: modules that register config sections: one registry per process, so they must be shared
SECTION_MODULES = ("config", "adapt", "train")


class ABError(Exception):
    """A one-line reason the comparison cannot run."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extract(rev: str, dest: Path) -> Path:
    """``model/`` of ``rev`` as the package ``dest/model_rev``; the list of modules that differ."""
    try:
        tree = subprocess.run(["git", "-C", str(REPO), "archive", "--prefix=model_rev/", f"{rev}:model"],
                              check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise ABError(f"git archive of {rev}:model failed ({err.decode(errors='replace').strip() or e}); "
                      "pass a commit of this repository, e.g. HEAD~1") from None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tree, check=True)
    return dest / "model_rev"


def _local_imports(src: str) -> set[str]:
    """The package-relative modules a module's source imports (``from .x import``, ``from . import x``)."""
    deps = set(re.findall(r"^\s*from \.(\w+)", src, re.M))
    for names in re.findall(r"^\s*from \. import ([\w, ]+)", src, re.M):
        deps |= {n.strip().split(" as ")[0].strip() for n in names.split(",")}
    return deps


def share_unchanged(pkg: Path) -> list[str]:
    """Alias the revision's unchanged modules to the working tree's (``sys.modules``); returns the
    names of the modules loaded from the revision: those that differ, and those that import one
    of them (directly or not), since an alias would run the working tree's version of what
    they import.  Raises if a config-registering module is among them."""
    mods = {f.stem: f for f in sorted(pkg.glob("*.py")) if f.stem != "__init__"}
    changed = {name for name, f in mods.items()
               if not (REPO / "model" / f.name).is_file() or _digest(REPO / "model" / f.name) != _digest(f)}
    for d in (p for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):  # subpackages
        cur = REPO / "model" / d.name
        if any(not (cur / f.relative_to(d)).is_file() or _digest(cur / f.relative_to(d)) != _digest(f)
               for f in d.rglob("*.py")):
            changed.add(d.name)
    differs = set(changed)
    deps = {name: _local_imports(f.read_text()) for name, f in mods.items()}
    grew = True
    while grew:  # importers of a changed module come from the revision too
        grew = False
        for name in mods:
            if name not in changed and deps[name] & changed:
                changed.add(name)
                grew = True
    for name in sorted(changed & set(SECTION_MODULES)):
        why = "differs" if name in differs else "imports a module that differs"
        raise ABError(f"model/{name}.py {why} between the revision and the working tree; it registers a config "
                      "section, which one process can hold once: compare revisions with the same config")
    for name in mods:
        if name not in changed:
            sys.modules[f"model_rev.{name}"] = importlib.import_module(f"model.{name}")
    return sorted(changed)


def _inputs(kind: str, size: Any, n: int, cfg: Any) -> list[Any]:
    from benchmarks import inputs

    if kind == "scene":
        ev, _ = inputs.scene_events(cfg, size, n)
    elif kind.startswith("noise:"):
        try:
            density = float(kind.split(":", 1)[1])
        except ValueError:
            raise ABError(f"--input {kind!r} is not allowed; use scene or noise:<density>, e.g. noise:0.01") from None
        ev = inputs.noise_events(size, density, n)
    else:
        raise ABError(f"--input {kind!r} is not allowed; use scene or noise:<density>, e.g. noise:0.01")
    return inputs.bin_steps(ev, size)[:n]


def run(rev: str, rounds: int, overlap: bool, kind: str, size_text: str, n_steps: int) -> dict[str, Any]:
    from benchmarks import inputs
    from benchmarks.bench_model import model_config
    from stream.metrics import Metrics
    from stream.node import RunContext

    try:
        size = inputs.parse_size(size_text)
    except ValueError as e:
        raise ABError(f"--size {e}") from None
    if rounds < 1 or n_steps < 1:
        raise ABError("--rounds and --steps must be >= 1")
    torch.set_num_threads(1)  # as the engine runs the model
    tmp = tempfile.TemporaryDirectory(prefix="spikestream-ab-")
    pkg = extract(rev, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    changed = share_unchanged(pkg)
    rev_node = importlib.import_module("model_rev.node")
    cur_node = importlib.import_module("model.node")
    cfg = model_config(overlap=overlap)
    steps = _inputs(kind, size, n_steps, cfg)
    mb = cfg["engine"].max_batch
    nodes = {}
    for name, mod in (("rev", rev_node), ("work", cur_node)):
        node = mod.build_model_node(cfg, size, cfg["binner"].channels, "cpu")
        node.open(RunContext(stop=threading.Event(), metrics=Metrics()))
        nodes[name] = node

    def one(node: Any) -> tuple[float, list[Any]]:
        node.reset()
        t0 = time.perf_counter()
        out = []
        n = len(steps)
        for i in range(0, n, mb):
            out.extend(node.iter_batch(steps[i:i + mb], more=lambda i=i: i + mb < n))
        out.extend(node.flush())
        return n / (time.perf_counter() - t0), out

    try:
        _, a = one(nodes["rev"])
        _, b = one(nodes["work"])
        same = len(a) == len(b) and all(
            np.array_equal(x.mask, y.mask) and x.layer_spikes == y.layer_spikes and x.instances == y.instances
            for x, y in zip(a, b))
        if not same:
            raise ABError(f"{rev} and the working tree give different results on this input; an A/B of speed "
                          "needs the same outputs")
        rates: dict[str, list[float]] = {"rev": [], "work": []}
        for r in range(rounds):
            for name in (("rev", "work") if r % 2 == 0 else ("work", "rev")):
                rates[name].append(one(nodes[name])[0])
    finally:
        for node in nodes.values():
            node.close()
        tmp.cleanup()
    ratios = [y / x for x, y in zip(rates["rev"], rates["work"])]
    return {"changed": changed, "rates": rates, "ratios": ratios,
            "median_rev": float(np.median(rates["rev"])), "median_work": float(np.median(rates["work"])),
            "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_model", description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="git revision whose model/ package is the baseline (e.g. HEAD~1)")
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--overlap", action="store_true", help="model.overlap: true (both cores)")
    ap.add_argument("--input", default="scene", help="scene (the built-in scene) or noise:<density>")
    ap.add_argument("--size", default="346x260")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args(argv)
    try:
        res = run(args.rev, args.rounds, args.overlap, args.input, args.size, args.steps)
    except ABError as e:
        print(f"ab_model: {e}", file=sys.stderr)
        return 2
    mode = "overlap" if args.overlap else "one thread"
    print(f"{args.input} {args.size}, {mode}, {args.rounds} rounds of {args.steps} steps; modules that differ: "
          f"{', '.join(res['changed']) or 'none'}")
    print(f"  {args.rev}: {[round(v) for v in res['rates']['rev']]}")
    print(f"  work tree: {[round(v) for v in res['rates']['work']]}")
    print(f"  medians {res['median_rev']:.0f} -> {res['median_work']:.0f} steps/s; work/rev median "
          f"{res['ratio_median']:.3f} (range {res['ratio_min']:.3f}-{res['ratio_max']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
