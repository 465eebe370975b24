"""benchmarks.ab_dense_cpu: a tiny run checks both decoders agree and reports both rates; bad
arguments end with one line."""
from __future__ import annotations

import pytest

from benchmarks import ab_dense_cpu


def test_tiny_run_reports_both_decoders(capsys: pytest.CaptureFixture[str]) -> None:
    assert ab_dense_cpu.main(["--sizes", "48x40", "--steps", "6", "--rounds", "2", "--threads", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("48x40 scene, ") and line.endswith("identical results") and "\n" not in line
    r = ab_dense_cpu.compare(ab_dense_cpu.SensorSize(48, 40), 6, 1)
    assert r["conv3_per_step"] > 10 and r["crops"] > 0 and r["auto"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


@pytest.mark.parametrize("args,msg", [
    (["--sizes", "48by40"], "is not WIDTHxHEIGHT"),
    (["--sizes", "2x40"], "too small"),
    (["--rounds", "0"], "must be >= 1"),
])
def test_bad_arguments_are_one_line(args: list[str], msg: str) -> None:
    with pytest.raises(SystemExit, match=msg):
        ab_dense_cpu.main(args)
