"""Recipe YAML and typed configs under hostile input: every problem is one fast line naming file, line or key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from compress.config import check_finite, check_positive, from_dict
from compress.errors import AdcError, short_repr
from compress.yaml_io import load_yaml, parse_yaml_value

ROOT = Path(__file__).resolve().parents[1]


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Each anchor is a list of ``width`` aliases to the previous one: ``width ** levels`` values once expanded."""
    parts = ["&a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "name: bomb\nseed: [" + ", ".join(parts) + "]\n"


def _write(tmp_path: Path, data: bytes | str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_shipped_recipes_read_the_same_as_safe_load():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert load_yaml(path) == yaml.safe_load(path.read_text()), path.name


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("5E-3", 5e-3), ("-2e+2", -200.0), ("0.5", 0.5), (".5", 0.5), ("1.", 1.0),
    ("3", 3), ("012", 12), ("0x1f", 31), ("0o17", 15), ("-7", -7),
    ("off", "off"), ("on", "on"), ("yes", "yes"), ("no", "no"), ("true", True), ("False", False),
    ("1:30", "1:30"), ("2024-01-01", "2024-01-01"), ("1_000", "1_000"), ("~", None), ("[1e-4, off]", [1e-4, "off"]),
])
def test_scalars_follow_yaml_1_2(text, value):
    got = parse_yaml_value(text, "--set x")
    assert got == value and type(got) is type(value)


def test_alias_bomb_fails_fast_with_the_line(tmp_path):
    path = _write(tmp_path, _bomb())  # 9 ** 9 = 387 M values if expanded
    t0 = time.perf_counter()
    with pytest.raises(AdcError, match=r"r\.yaml: line 2: .*expands to more than 100000 values") as info:
        load_yaml(path)
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in str(info.value)
    # A few sane anchors are fine.
    ok = _write(tmp_path, "base: &b {lr: 1e-4, steps: 3}\nstage: {<<: *b, steps: 5}\nagain: *b\n", "ok.yaml")
    assert load_yaml(ok) == {"base": {"lr": 1e-4, "steps": 3}, "stage": {"lr": 1e-4, "steps": 5},
                             "again": {"lr": 1e-4, "steps": 3}}


def test_self_referring_alias_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(AdcError, match="refers to a value that contains it"):
        load_yaml(_write(tmp_path, "a: &a [1, *a]\n"))
    t0 = time.perf_counter()
    with pytest.raises(AdcError, match="nested more than 64 levels"):
        load_yaml(_write(tmp_path, "[" * 100_000))
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("text, fragment", [
    ("name: a\nseed: 1\nseed: 2\n", "line 3: not valid YAML (duplicate key 'seed' (first given on line 2)"),
    ("x: {a: 1, a: 2}\n", "line 1: not valid YAML (duplicate key 'a' (first given on line 1)"),
    ("name: a\n---\nname: b\n", "line 2: not valid YAML (but found another document)"),
    ("name: [1, 2\n", "not valid YAML"),
    ("name: a\x07b\n", "line 1: character #x0007 is not allowed in YAML"),
])
def test_malformed_recipes_are_one_line(tmp_path, text, fragment):
    with pytest.raises(AdcError) as info:
        load_yaml(_write(tmp_path, text))
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "r.yaml")) and fragment in msg and "\n" not in msg


def test_file_level_problems_are_one_line(tmp_path):
    with pytest.raises(AdcError, match=r"not UTF-8 text \(byte 0xe9 at offset 17, line 2\)"):
        load_yaml(_write(tmp_path, "seed: 1\nname: caf\xe9\n".encode("latin-1")))
    assert load_yaml(_write(tmp_path, b"\xef\xbb\xbfname: bom\n")) == {"name": "bom"}  # a UTF-8 BOM is fine
    big = _write(tmp_path, b"x: 1\n" * 300_000)  # 1.5 MB
    t0 = time.perf_counter()
    with pytest.raises(AdcError, match="larger than 262144 bytes"):
        load_yaml(big)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(AdcError, match="recipe not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(AdcError, match="is a folder"):
        load_yaml(tmp_path)


# ----------------------------------------------------------------------------- typed configs


@dataclass
class Train:
    lr: float = 1e-4
    steps: int = 10
    latency: Literal["auto", "on", "off"] = "auto"
    name: str = "x"


def test_config_values_are_finite_and_errors_bounded():
    assert from_dict(Train, {"lr": "1e-4"}).lr == 1e-4  # YAML 1.1 (safe_load) gives a string: users write it
    assert from_dict(Train, {"lr": 5e-3, "steps": 3}).lr == 5e-3
    for bad in (float("nan"), float("inf"), "nan", ".inf"):
        with pytest.raises(AdcError, match=r"recipe\.lr: expected a (finite )?number"):
            from_dict(Train, {"lr": bad})
    assert from_dict(Train, {"latency": False}).latency == "off"  # `latency: off` under YAML 1.1
    assert from_dict(Train, {"latency": True}).latency == "on"
    huge = [list(range(1000))] * 1000
    t0 = time.perf_counter()
    with pytest.raises(AdcError) as info:
        from_dict(Train, {"steps": huge})
    assert time.perf_counter() - t0 < 0.1 and len(str(info.value)) < 140
    with pytest.raises(AdcError, match=r"recipe\.1: unknown key"):
        from_dict(Train, {1: 2, "lr": 1.0})  # a non-string key sorts with the others instead of a TypeError


def test_alias_bomb_as_a_typed_value_is_fast_without_the_loader():
    """Even through yaml.safe_load (no expansion limit), the type error quotes a bounded repr."""
    raw = yaml.safe_load(_bomb())
    t0 = time.perf_counter()
    with pytest.raises(AdcError, match=r"recipe\.steps: expected an integer, got \[\["):
        from_dict(Train, {"steps": raw["seed"]})
    assert time.perf_counter() - t0 < 0.5


def test_helpers_for_the_callers_checks():
    assert check_finite(0.5, "x") == 0.5 and check_positive(1e-4, "train_teacher.lr") == 1e-4
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(AdcError, match="train_teacher.lr"):
            check_positive(bad, "train_teacher.lr")
    assert short_repr("a" * 1000).endswith("'") and len(short_repr("a" * 1000)) < 80
    assert len(short_repr({i: list(range(100)) for i in range(100)})) <= 80
