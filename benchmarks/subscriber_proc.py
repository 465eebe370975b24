"""Subscriber process for the latency/throughput benchmarks.

``python -m benchmarks.subscriber_proc ENDPOINT OUT.json IDLE_S``: receive ``mask.v1``
messages, stamp each with ``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux, shared
with the publisher process), and write ``{"recv_ns": {step: ns}, "missed": n}`` once no
message came for ``IDLE_S`` seconds after the first one (or 60 s without any).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sinks.subscriber import MaskSubscriber


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m benchmarks.subscriber_proc ENDPOINT OUT.json IDLE_S", file=sys.stderr)
        return 2
    endpoint, out, idle_s = argv[0], Path(argv[1]), float(argv[2])
    recv: dict[int, int] = {}
    with MaskSubscriber(endpoint, rcvhwm=100_000) as sub:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            msg = sub.recv(timeout=0.05)
            if msg is None:
                continue
            recv[msg.step] = time.perf_counter_ns()
            deadline = time.monotonic() + idle_s
        missed = sub.missed
    out.write_text(json.dumps({"recv_ns": recv, "missed": missed}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
