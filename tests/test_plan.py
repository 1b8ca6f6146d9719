"""The analysis plan: what remove/fold/prune consume, recipe overrides, and its JSON round trip."""

from __future__ import annotations

import pytest

from compress.analysis import Plan, analyse
from compress.errors import AdcError
from compress.families import build, get

pytestmark = pytest.mark.usefixtures("one_thread_module")
ATTN = "unet.mid_block.attentions.0.transformer_blocks.0.attn2"


def _analyse(prompt="dropped", **kw):
    fam = get("osediff")
    teacher = build("osediff", "tiny", "meta")
    return analyse(teacher, fam.facts(prompt, 999), fam.example_inputs(32, "meta", teacher), call=fam.analysis_call,
                   **kw)


@pytest.fixture(scope="module")
def plan():
    return _analyse(prune=False).plan


def test_the_plan_says_what_each_stage_does(plan):
    removed = {d.module for d in plan.of("remove")}
    assert {"prompt_extractor", "text_encoder", "vae.encoder", ATTN} <= removed
    folded = {d.module for d in plan.of("fold")}
    assert "unet.time_embedding" in folded and plan.constants == {"timestep": 999}
    part = plan.part("unet")  # names relative to the part, as its own module sees them
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in part.names("remove")
    assert "time_embedding" in part.names("fold")
    assert plan.reencoder["replacement"].startswith("replaceable by PixelUnshuffle(2)")
    again = Plan.from_dict(plan.to_dict())  # plan.json: what a resumed run reads back (no graphs)
    assert [d.module for d in again.decisions] == [d.module for d in plan.decisions]


def test_keep_overrides_a_removal_and_the_ops_refuse_to_disagree():
    import copy

    from compress.prune import remove_conditioning

    analysis = _analyse(prune=False, keep=[ATTN])
    plan = analysis.plan
    assert ATTN not in {d.module for d in plan.of("remove")}
    kept = {d.module: d.reason for d in plan.of("keep")}
    assert kept[ATTN].startswith("kept by the recipe (analyse.keep")
    assert "mixes the dropped prompt" in kept[ATTN]  # what the analysis would have done, and why
    unet = copy.deepcopy(build("osediff", "tiny", "meta").unet)
    with pytest.raises(AdcError, match="which the plan keeps"):
        remove_conditioning(unet, drop=("cross_attention",), planned=plan.part("unet").names("remove"))


def test_overrides_are_validated_naming_the_module():
    with pytest.raises(AdcError, match=r"analyse.keep: 'unet.nope\*' matches no module"):
        _analyse(prune=False, keep=["unet.nope*"])
    with pytest.raises(AdcError, match="analyse.prune: 'text_encoder' is removable"):
        _analyse(extra_scopes=["text_encoder"])  # the prompt is dropped: its encoder goes
    with pytest.raises(AdcError, match="analyse.prune: 'unet.down_blocks' is already pruned"):
        _analyse(extra_scopes=["unet.down_blocks"])


def test_prune_override_adds_a_scope():
    plan = _analyse("variable", extra_scopes=["text_encoder"]).plan  # a per-image prompt: the encoder stays
    assert "text_encoder" in plan.scopes and plan.scopes["text_encoder"].groups
    assert plan.overrides["prune"] == ["text_encoder"]
