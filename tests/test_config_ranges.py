"""Every numeric recipe key carries a range, and a value outside it is one line naming the key.

A value no check stops reaches torch as a traceback (a negative crop, ``threads: 0``) or runs for
days (``max_steps: 1e12``); declaring the range on the field (``compress.config.ranged``) and
walking every config here keeps a new key from slipping through.
"""

import dataclasses
import types
from typing import Union, get_args, get_origin, get_type_hints

import pytest

from compress import families
from compress.config import from_dict
from compress.data.degradation import DegradationConfig
from compress.errors import AdcError
from compress.recipe import Recipe
from compress.stages import STAGES


def _numeric_fields(root):
    """(config class, field) for every int/float field reachable from ``root``'s type hints."""
    seen, out = set(), []

    def walk(tp):
        if get_origin(tp) in (Union, types.UnionType, list, tuple, dict):
            for arg in get_args(tp):
                if arg not in (type(None), Ellipsis):
                    walk(arg)
            return
        if not dataclasses.is_dataclass(tp) or tp in seen:
            return
        seen.add(tp)
        hints = get_type_hints(tp)
        for f in dataclasses.fields(tp):
            tp_f = hints[f.name]
            args = get_args(tp_f) if get_origin(tp_f) in (Union, types.UnionType) else (tp_f,)
            if any(a in (int, float) for a in args):
                out.append((tp, f))
            walk(tp_f)

    walk(root)
    return out


def _all_numeric_fields():
    roots = [Recipe, DegradationConfig, *(s.config_cls for s in STAGES.values())]
    for name in families.available():
        fam = families.get(name)
        roots += [fam.Weights, fam.Options]
    found = {}
    for root in roots:
        for cls, f in _numeric_fields(root):
            found[(cls, f.name)] = f
    return found


def test_every_numeric_key_of_every_config_has_a_range():
    fields = _all_numeric_fields()
    assert len(fields) > 50  # the walk reaches the stages' and the families' configs
    missing = sorted(f"{cls.__module__}.{cls.__name__}.{name}" for (cls, name), f in fields.items()
                     if "range" not in f.metadata)
    assert not missing, missing


@pytest.mark.parametrize("key", ["recover.engine.EngineConfig.max_steps", "stages.profile.ProfileConfig.repeats",
                                 "recover.distill.DistillConfig.crop", "data.degradation.DegradationConfig.sinc_prob"])
def test_a_value_past_either_end_is_one_line_naming_the_key(key):
    fields = {f"{c.__module__.removeprefix('compress.')}.{c.__name__}.{n}": (c, f)
              for (c, n), f in _all_numeric_fields().items()}
    cls, f = fields[key]
    lo, hi = f.metadata["range"]
    required = {g.name: 1 for g in dataclasses.fields(cls)
                if g.init and g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING}
    for bad in (lo - 1, hi * 10 + 1):
        with pytest.raises(AdcError) as info:
            from_dict(cls, {**required, f.name: type(lo)(bad) if isinstance(lo, int) else float(bad)}, "r")
        assert str(info.value).startswith(f"r.{f.name}: ") and "outside" in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, line", [
    ("threads=0", "recipe.threads: 0 is outside [1, 1024]"),
    ("seed=-1", "recipe.seed: -1 is outside"),
    ("stages.remove.unshuffle=0", "recipe.stages.remove.unshuffle: 0 is outside [1, 16]"),
])
def test_a_recipe_out_of_range_is_refused_with_the_dotted_key(override, line):
    import yaml

    from tests.helpers import STUDENT_RUN

    raw = yaml.safe_load(STUDENT_RUN)
    from compress.recipe import apply_overrides, parse_recipe

    with pytest.raises(AdcError, match=line.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(apply_overrides(raw, [override]))


@pytest.mark.parametrize("module", ["compress.sr", "compress.export", "compress.evaluate", "compress.run",
                                    "compress.analysis.__main__", "compress.deploy.fp16", "compress.recover.tiny",
                                    "profiling.compare"])
def test_every_numeric_flag_of_every_command_has_a_range(module, monkeypatch, capsys):
    import argparse
    import importlib

    from compress.config import Number

    seen = []
    add = argparse.ArgumentParser.add_argument

    def recording(self, *args, **kwargs):
        seen.append((args[0], kwargs.get("type")))
        return add(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--help"])
    assert info.value.code == 0 and seen
    plain = [flag for flag, tp in seen if tp in (int, float)]
    assert not plain, f"{module}: {plain} take a number with no range (use compress.config.int_in / float_in)"
    assert all(tp.lo <= tp.hi for _, tp in seen if isinstance(tp, Number))


def test_a_flag_out_of_range_is_argparses_one_error_line(capsys):
    from compress.sr import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "adcsr", "--input", "x", "--output", "y", "--threads", "-3"])
    assert info.value.code == 2
    assert "error: argument --threads: -3: expected a value in [0, 1024]" in capsys.readouterr().err
