"""remove_modules / remove_conditioning: patterns, replacements, records, errors."""

import json

import pytest
import torch
from torch import nn

from compress.errors import AdcError
from compress.prune import Constant, ModuleSpec, remove_conditioning, remove_modules
from compress.zoo.sd import build_unet
from compress.zoo.unet import ConditionFreeUNet, conditioning_modules


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _toy():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def test_glob_regex_identity_constant_spec():
    m, rec = remove_modules(_toy(), "2.*", "identity")
    assert isinstance(m[2][0], nn.Identity) and isinstance(m[2][1], nn.Identity)
    assert rec.params_before - rec.params_after == 8 * 8 + 8 + 8 * 2 + 2
    assert [c.name for c in rec.changes] == ["2.0", "2.1"]
    json.dumps(rec.to_dict())

    m, rec = remove_modules(_toy(), r"re:2\.\d", ModuleSpec("torch.nn:Identity"))
    assert rec.args["replacement"] == {"kind": "spec", "target": "torch.nn:Identity", "kwargs": {}}
    assert isinstance(m[2][1], nn.Identity)

    m, _ = remove_modules(_toy(), "2", torch.ones(1, 2))
    assert isinstance(m[2], Constant)
    assert torch.equal(m(torch.randn(3, 4)), torch.ones(1, 2))


def test_outermost_match_only_and_none_in_container_refused():
    m, rec = remove_modules(_toy(), ["2", "2.0"], "identity")  # 2.0 is inside 2
    assert [c.name for c in rec.changes] == ["2"]
    with pytest.raises(AdcError, match="identity"):
        remove_modules(_toy(), "2.0", None)


def test_pattern_matching_nothing_names_it():
    with pytest.raises(AdcError, match=r"'\*\.attn9'"):
        remove_modules(_toy(), "*.attn9")
    with pytest.raises(AdcError, match="regular expression"):
        remove_modules(_toy(), "re:(")


def test_module_instance_replacement_is_marked_unreplayable():
    _, rec = remove_modules(_toy(), "1", nn.GELU())
    assert rec.args["replacement"]["replayable"] is False


def test_remove_conditioning_gives_condition_free_unet():
    unet = build_unet("tiny")
    n0 = sum(p.numel() for p in unet.parameters())
    model, rec = remove_conditioning(unet)
    assert isinstance(model, ConditionFreeUNet)
    names = [n for n, _ in model.named_modules()]
    assert not any(n.endswith(("time_emb_proj", "attn2")) or "time_embedding" in n or "time_proj" in n for n in names)
    assert not any(n.endswith("transformer_blocks.0.norm2") for n in names)
    assert conditioning_modules(model) == []
    assert rec.params_before == n0 and rec.params_after == sum(p.numel() for p in model.parameters())
    assert {c.name for c in rec.changes} >= {"time_embedding", "time_proj", "down_blocks.0.resnets.0.time_emb_proj",
                                             "down_blocks.0.attentions.0.transformer_blocks.0.attn2"}
    with torch.no_grad():
        assert model(torch.randn(1, 4, 16, 16)).shape == (1, 4, 16, 16)


def test_remove_only_cross_attention_keeps_diffusers_model():
    unet = build_unet("tiny")
    model, rec = remove_conditioning(unet, drop=["cross_attention"])
    assert isinstance(model, type(unet)) and rec.extra["result"] == "UNet2DConditionModel"
    assert not any(n.endswith("attn2") for n, _ in model.named_modules())
    with torch.no_grad():
        assert model(torch.randn(1, 4, 16, 16), 999, None).sample.shape == (1, 4, 16, 16)
    same, _ = remove_conditioning(unet, drop=["cross_attention"], inplace=True)  # the caller owns it
    assert same is unet and not any(n.endswith("attn2") for n, _ in unet.named_modules())


def test_transforms_leave_the_original_running():
    """A copy is edited by default: the caller's UNet keeps every module and its exact output."""
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    x, t, ehs = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, ehs).sample
    names = [n for n, _ in unet.named_modules()]
    small, _ = remove_conditioning(unet)
    small, _ = remove_modules(small, "conv_act", "identity")
    with torch.no_grad():
        assert torch.equal(unet(x, t, ehs).sample, before) and small(x).shape == (1, 4, 16, 16)
    assert [n for n, _ in unet.named_modules()] == names


def test_remove_conditioning_errors():
    with pytest.raises(AdcError, match="subset"):
        remove_conditioning(build_unet("tiny"), drop=["text"])
    model, _ = remove_conditioning(build_unet("tiny"))
    with pytest.raises(AdcError, match="nothing to remove"):
        remove_conditioning(model)
