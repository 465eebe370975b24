"""Config strictness: unknown keys and sections name themselves, types are checked, YAML is safe."""
from __future__ import annotations

from pathlib import Path

import pytest

from stream.binner import BinnerConfig
from stream.config import CONFIG_DIR, build, load_config, read_yaml, to_dict
from stream.node import UsageError


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(UsageError) as e:
        build(BinnerConfig, {"bin_size": 5})
    msg = str(e.value)
    assert "binner.bin_size" in msg and "bin_us" in msg and "polarity" in msg


def test_wrong_types_are_refused() -> None:
    with pytest.raises(UsageError, match="expected an integer"):
        build(BinnerConfig, {"bin_us": "fast"})
    with pytest.raises(UsageError, match="expected an integer"):
        build(BinnerConfig, {"bin_us": True})


def test_unknown_section_in_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("binnr:\n  bin_us: 5\n")
    with pytest.raises(UsageError, match="unknown config section 'binnr'"):
        load_config(p)


def test_file_and_overrides_layer_in_order(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("binner:\n  bin_us: 2000\n  polarity: merge\n")
    cfg = load_config(p, overrides={"binner": {"bin_us": 500}})
    assert cfg["binner"].bin_us == 500 and cfg["binner"].polarity == "merge"


def test_yaml_is_parsed_safely(tmp_path: Path) -> None:
    p = tmp_path / "evil.yaml"
    p.write_text("binner: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UsageError, match="safe loading refuses"):
        read_yaml(p)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("binner: [1, 2\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(bad)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match="igarss2023"):
        load_config(preset="nope")


def test_presets_load() -> None:
    for name in ("igarss2023", "kheradpisheh2018"):
        cfg = load_config(preset=name)
        assert cfg.preset == name
    paper = load_config(preset="igarss2023")["model"]
    assert (paper.theta1, paper.lambda1, paper.lambda2, paper.leak) == (10.0, 9.0, 1.0, "subtractive")
    assert load_config().preset == "default"


def test_default_yaml_is_the_resolved_default() -> None:
    """configs/default.yaml is `run.py --print-config` output: it must not drift from the code."""
    cfg = load_config()
    on_disk = read_yaml(CONFIG_DIR / "default.yaml")
    assert on_disk == cfg.to_dict(), "regenerate with: python run.py --print-config > configs/default.yaml"
    # and it loads back as a config file, giving the same thing
    assert load_config(CONFIG_DIR / "default.yaml").to_dict() == cfg.to_dict()
    assert to_dict(cfg["binner"])["bin_us"] == cfg["binner"].bin_us
