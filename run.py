#!/usr/bin/env python3
"""SpikeStream command line: parse, load config, look names up in registries, run.

    python run.py [--source SRC] [--sink SINK ...] [options]     stream and segment
    python run.py train     ...                                  layer-wise STDP training
    python run.py eval      ...                                  score masks against ground truth
    python run.py subscribe ...                                  print masks from a publisher

Exit codes: 0 success, 1 runtime failure, 2 usage error.  Everything that is not
argument plumbing lives in the packages (stream/, sources/, model/, sinks/).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

SUBCOMMANDS = {
    "train": ("model.train", "layer-wise STDP + WTA training (Conv2, then Conv3)"),
    "eval": ("sinks.evaluation", "score masks and instances against ground truth"),
    "subscribe": ("sinks.subscriber", "print mask.v1 messages from a publisher"),
}


def _catalogue() -> str:
    from stream.registry import SINKS, SOURCES, load_plugins

    load_plugins()
    lines = ["sources (--source):"]
    lines += [f"  {e.name:<10} {e.summary}\n  {'':<10} e.g. --source {e.example}" for e in SOURCES.values()]
    lines.append("sinks (--sink, repeatable):")
    lines += [f"  {e.name:<10} {e.summary}\n  {'':<10} e.g. --sink {e.example}" for e in SINKS.values()]
    lines.append("subcommands:")
    lines += [f"  {name:<10} {summary} (python run.py {name} --help)" for name, (_, summary) in SUBCOMMANDS.items()]
    lines.append("exit codes: 0 success, 1 runtime failure, 2 usage error")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="SpikeStream: real-time SpikeSEG segmentation of event-camera streams.",
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", default="synthetic", help="input: synthetic[:SCENE], camera[:SERIAL], FILE.aedat4, DIR, 'GLOB', tcp://HOST:PORT, unix:PATH (default: synthetic)")
    p.add_argument("--sink", action="append", default=None, help="output, repeatable: zmq[:ENDPOINT], overlay[:PATH.mp4|.avi|DIR/], record:PATH.aedat4 (default: overlay)")
    p.add_argument("--config", "-c", default=None, help="YAML config file (sections as in configs/default.yaml)")
    p.add_argument("--preset", default=None, help="default (IGARSS 2023 network calibrated for event bins), or paper-exact igarss2023 | kheradpisheh2018")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="model device (default auto: CUDA when present)")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds of sensor time")
    p.add_argument("--weights", default=None, metavar="PATH", help="model checkpoint (default: the shipped weights)")
    p.add_argument("--bin-us", type=int, default=None, metavar="US", help="time-step length in microseconds")
    p.add_argument("--realtime", action="store_true", help="pace file replay / synthetic scene to sensor time")
    p.add_argument("--speed", type=float, default=None, metavar="F", help="replay speed factor with --realtime (0.25 .. 100)")
    p.add_argument("--start", type=float, default=None, metavar="S", help="replay from S seconds after the file's first event")
    p.add_argument("--end", type=float, default=None, metavar="S", help="replay until S seconds after the file's first event")
    p.add_argument("--loop", action="store_true", help="replay forever, resetting the model state at each wrap")
    p.add_argument("--topic", default=None, help="ZeroMQ topic (default masks)")
    p.add_argument("--zmq-hwm", type=int, default=None, metavar="N", help="ZeroMQ send high-water mark (default 1000)")
    p.add_argument("--no-compress", action="store_true", help="send masks uncompressed (encoding u8)")
    p.add_argument("--wait-subscribers", type=int, default=None, metavar="N", help="start the source only after N subscribers joined")
    p.add_argument("--zmq-curve", default=None, metavar="KEYDIR", help="CURVE encryption/authentication with keys from KEYDIR")
    p.add_argument("--adapt", action="store_true", help="keep learning (online STDP) while streaming; runs the dense model path, "
                   "far slower on CPU than the default (docs/quality.md, section 5)")
    p.add_argument("--adapt-layers", default=None, metavar="L", help="layers to adapt, comma-separated: conv2[,conv3]")
    p.add_argument("--save-weights", default=None, metavar="PATH", help="with --adapt: write the adapted checkpoint here")
    p.add_argument("--overwrite", action="store_true", help="allow outputs to replace existing files")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="folder for run folders (default ./runs)")
    p.add_argument("--stats-json", default=None, metavar="PATH", help="write the run's metrics as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no status line or progress bar")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def overrides_from_args(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Map CLI flags onto config sections (flags override the config file)."""
    o: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    put("engine", "device", a.device)
    put("engine", "runs_dir", a.output)
    put("binner", "bin_us", a.bin_us)
    if a.realtime:
        put("replay", "realtime", True)
        put("synthetic", "realtime", True)
    put("replay", "speed", a.speed)
    put("replay", "start_s", a.start)
    put("replay", "end_s", a.end)
    if a.loop:
        put("replay", "loop", True)
    if a.quiet:
        put("replay", "progress", False)
    put("zmq", "topic", a.topic)
    put("zmq", "hwm", a.zmq_hwm)
    if a.no_compress:
        put("zmq", "compress", False)
    put("zmq", "wait_subscribers", a.wait_subscribers)
    put("zmq", "curve_dir", a.zmq_curve)
    if a.overwrite:
        put("overlay", "overwrite", True)
        put("record", "overwrite", True)
    if a.adapt:
        put("adapt", "enabled", True)
    if a.adapt_layers:
        put("adapt", "layers", [s.strip() for s in a.adapt_layers.split(",") if s.strip()])
    put("adapt", "save_weights", a.save_weights)
    return o


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main_run(argv: list[str]) -> int:
    from stream.config import load_config
    from stream.engine import run_pipeline
    from stream.node import NodeError, UsageError
    from stream.registry import build_sink, build_source

    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(a.config, a.preset, overrides_from_args(a))
        if a.print_config:
            print(cfg.dump(), end="")
            return 0
        if a.stats_json and Path(a.stats_json).exists() and not a.overwrite:
            raise UsageError(f"{a.stats_json} exists; pass --overwrite to replace it, or pick another path")
        source = build_source(a.source, cfg)
        sinks = [build_sink(s, cfg) for s in (a.sink or ["overlay"])]
        summary = run_pipeline(
            cfg, source, sinks,
            weights=a.weights, duration_s=a.duration,
            status_stream=None if a.quiet else sys.stderr,
            stats_json=a.stats_json, install_signals=True,
        )
    except UsageError as e:
        return _fail(str(e), 2)
    except NodeError as e:
        return _fail(str(e), 1)
    print(f"summary: {summary.text()}", file=sys.stderr)
    if summary.run_dir is not None:
        print(f"run folder: {summary.run_dir}", file=sys.stderr)
    if summary.error:
        return _fail(summary.error, summary.exit_code or 1)
    return 0


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM during start-up (imports, opening devices) behaves like Ctrl-C; the pipeline
    # installs its own graceful handlers once it runs.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        from stream.node import NodeError, UsageError

        module_name, summary = SUBCOMMANDS[argv[0]]
        mod = importlib.import_module(module_name)
        p = argparse.ArgumentParser(prog=f"run.py {argv[0]}", description=summary)
        mod.add_arguments(p)
        args = p.parse_args(argv[1:])
        try:
            return int(mod.main(args))
        except UsageError as e:
            return _fail(str(e), 2)
        except NodeError as e:
            return _fail(str(e), 1)
        except KeyboardInterrupt:
            return _fail("interrupted", 1)
    try:
        return main_run(argv)
    except KeyboardInterrupt:
        return _fail("interrupted during start-up", 1)


if __name__ == "__main__":
    code = main()
    # Every node is closed by now; skip interpreter teardown (torch/numba/dv native
    # finalisers took up to 0.9 s after a signal), so Ctrl-C exits well within 2 s.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
