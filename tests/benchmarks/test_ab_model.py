"""benchmarks.ab_model's guards (the A/B itself compiles a second copy of every kernel, a minute
or more, so it is run by hand, not here): a bad revision, a config module that differs, a bad
input, each a one-line error; unchanged modules are shared with the working tree."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from benchmarks import ab_model


def test_bad_revision_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert ab_model.main(["no-such-revision-xyz", "--rounds", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ab_model: git archive of no-such-revision-xyz:model failed") and "\n" not in err
    assert "pass a commit of this repository" in err


def test_unchanged_modules_are_shared_and_a_changed_config_is_refused(tmp_path: Path) -> None:
    """Unchanged modules are the working tree's, unless they import a changed one (else the
    revision's node would run the working tree's kernels: a first version compared the working
    tree with itself whenever node.py was unchanged)."""
    pkg = tmp_path / "model_rev"
    pkg.mkdir()
    src = ab_model.REPO / "model"
    for name in ("__init__.py", "neurons.py", "config.py", "instances.py", "node.py"):
        shutil.copy(src / name, pkg / name)
    (pkg / "sparse.py").write_text("# another version\n")
    try:
        # instances imports sparse, node imports instances (and sparse): all three from the revision
        assert ab_model.share_unchanged(pkg) == ["instances", "node", "sparse"]
        import model.neurons

        assert sys.modules["model_rev.neurons"] is model.neurons
        assert "model_rev.node" not in sys.modules and "model_rev.instances" not in sys.modules
        (pkg / "config.py").write_text("# another config\n")
        with pytest.raises(ab_model.ABError, match="model/config.py differs .* registers a config section"):
            ab_model.share_unchanged(pkg)
    finally:
        for k in [k for k in sys.modules if k.startswith("model_rev")]:
            del sys.modules[k]


def test_bad_input_kind_is_refused() -> None:
    with pytest.raises(ab_model.ABError, match="--input 'sine' is not allowed; use scene or noise"):
        ab_model._inputs("sine", None, 2, None)
    with pytest.raises(ab_model.ABError, match="--input 'noise:x' is not allowed"):
        ab_model._inputs("noise:x", None, 2, None)
