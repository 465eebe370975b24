"""(f) Online adaptation cost per step (``model/adapt.py``, the learning helper's), when present.

Measured as the difference between the node's steps/s with and without adaptation on the
same scene input; skipped (reported) while ``model/adapt.py`` does not exist.
"""
from __future__ import annotations

import importlib.util

from .common import BenchSettings, Results


def run(results: Results, settings: BenchSettings) -> None:
    sec = "f online adaptation"
    if importlib.util.find_spec("model.adapt") is None:
        results.skip(sec, "adaptation cost per step", "model/adapt.py not present yet")
        return
    results.skip(sec, "adaptation cost per step", "model/adapt.py present but its API is not wired into the bench yet")
