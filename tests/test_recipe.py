"""Recipes: validated into dataclasses; every user mistake is one line with the key path."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.errors import AdcError
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_the_shipped_recipes_load():
    full = load_recipe(ROOT / "recipes" / "adcsr.yaml")
    assert [s.name for s in full.stages][:3] == ["analyse", "remove", "prune"]
    assert full.stage("prune").config.unet.slice.ratio_keep == 0.75
    assert full.stage("distill").config.lr_d == 1e-6
    tiny = load_recipe(ROOT / "recipes" / "adcsr-tiny.yaml")
    assert tiny.models.size == "tiny"
    assert tiny.data.train_hr[0].is_dir()  # relative to the recipe's folder


def test_set_overrides_reach_nested_stage_values():
    r = load_recipe(ROOT / "recipes" / "adcsr.yaml", ["stages.prune.unet.slice.ratio_keep=0.5", "seed=3"])
    assert r.stage("prune").config.unet.slice.ratio_keep == 0.5 and r.seed == 3


@pytest.mark.parametrize("text, expected", [
    ("name: x\nstages: [analyse]\nmodel: {}\n", r"r\.yaml\.model: unknown key"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - prune: {unet: {slice: {ratio_keep: fast}}}\n",
     r"stages\.prune\.unet\.slice\.ratio_keep: expected a number"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - prune: {unet: {slice: {ratio_keep: 1.5}}}\n",
     r"ratio_keep: 1\.5 is outside"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - prune: {}\n  - analyse: {}\n",
     r"stage 'analyse' cannot come after 'prune'"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - shrink: {}\n", r"unknown stage 'shrink'"),
    # a near miss names the key or stage meant
    ("name: x\nmodels: {family: osediff}\nstages:\n  - distill: {lr_gg: 1.0e-4}\n",
     r"r\.yaml\.stages\.distill\.lr_gg: unknown key; did you mean lr_g\?$"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - analyze: {}\n", r"unknown stage 'analyze'; did you mean analyse\?$"),
    ("name: x\nsed: 3\nstages: [analyse]\n", r"r\.yaml\.sed: unknown key; did you mean seed\?$"),
    ("name: x\nmodels: {family: osediff, weights: {osediff: /nonexistent/osediff.pkl}}\nstages: [analyse]\n",
     r"models\.weights\.osediff: .* does not exist"),
    ("name: x\ntask: {prompt: sometimes}\nstages: [analyse]\n", r"task\.prompt: 'sometimes' is not one of"),
    ("name: x\nmodels: {family: osediff}\nstages:\n  - distill: {prompt: fixed}\n", r"distill\.prompt_text"),
    # adc 0.1's schema gets a one-line migration message; the family is a plugin registry
    ("name: x\nmodels: {size: full, teacher: osediff, sd21_base: null}\nstages: [analyse]\n",
     r"models\.teacher: the recipe schema changed: write models: \{family: osediff"),
    ("name: x\nmodels: {family: esrgan}\nstages: [analyse]\n", r"models\.family: unknown model family 'esrgan'"),
    ("name: ../../etc\nmodels: {family: osediff}\nstages: [analyse]\n", r"name: '\.\./\.\./etc' must be a plain name"),
    ("stages: [analyse]\n", r"name: missing required key"),
    ("name: [x\n", r"not valid YAML"),
])
def test_bad_recipes_name_the_key(tmp_path, text, expected):
    with pytest.raises(AdcError, match=expected):
        load_recipe(_write(tmp_path, text))


def test_set_paths_with_a_typo_say_did_you_mean():
    with pytest.raises(AdcError, match=r"stages\.distill\.lr_gg: unknown key; did you mean lr_g\?$"):
        load_recipe(ROOT / "recipes" / "adcsr.yaml", ["stages.distill.lr_gg=1e-4"])
    with pytest.raises(AdcError, match=r"--set stages\.distil\.lr_g: no stage 'distil' in the recipe; did you mean distill\?"):
        load_recipe(ROOT / "recipes" / "adcsr.yaml", ["stages.distil.lr_g=1e-4"])
    with pytest.raises(AdcError, match=r"models\.sise: unknown key; did you mean size\?"):
        load_recipe(ROOT / "recipes" / "adcsr.yaml", ["models.sise=tiny"])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = _write(tmp_path, "name: x\nmodels: {family: osediff}\nstages:\n  - prune: {unet: {method: cut}}\n")
    proc = subprocess.run([sys.executable, "-m", "compress.run", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "stages.prune.unet.method" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a recipe that does not validate


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(ROOT / "recipes" / "osediff-tiny-teacher.yaml")
    again = yaml.safe_load(yaml.safe_dump(r.to_dict()))
    assert again["stages"][0]["train_teacher"]["crop"] == r.stage("train_teacher").config.crop
