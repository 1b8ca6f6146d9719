"""fold_timestep / fold_cross_attention: exact at the folded timestep / prompt."""

import copy
import json

import pytest
import torch

from compress.errors import AdcError
from compress.prune import fold_cross_attention, fold_timestep
from compress.zoo.sd import build_unet
from compress.zoo.unet import ConditionFreeUNet


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _randomise_biases(model):
    """Random init leaves some biases at zero; make every folded term matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_fold_equals_original_at_t999(norm):
    torch.manual_seed(0)
    unet = build_unet("tiny", resnet_time_scale_shift=norm)
    _randomise_biases(unet)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = unet(x, 999, ehs).sample
        other_t = unet(x, 500, ehs).sample
    folded, rec = fold_timestep(copy.deepcopy(unet), 999)
    assert isinstance(folded, ConditionFreeUNet)
    assert not any("time" in n for n, _ in folded.named_modules())
    with torch.no_grad():
        out = folded(x, encoder_hidden_states=ehs)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (other_t - ref).abs().max().item() > 1e-3  # the timestep does matter: the fold is not vacuous
    assert rec.extra["resnets_folded"] == 22 and rec.params_after < rec.params_before
    json.dumps(rec.to_dict())


def test_fold_refuses_class_embedding():
    unet = build_unet("tiny", num_class_embeds=3)
    with pytest.raises(AdcError, match="class"):
        fold_timestep(unet)


def test_fold_cross_attention_with_fixed_prompt():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    x, ehs = torch.randn(3, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        ref = unet(x, 999, ehs.expand(3, -1, -1)).sample
    folded, _ = fold_timestep(copy.deepcopy(unet))
    folded, rec = fold_cross_attention(folded, ehs)
    assert rec.params_after < rec.params_before
    assert sum(1 for c in rec.changes if c.action == "replaced") == 2 * 16  # to_k, to_v of 16 cross-attentions
    with torch.no_grad():
        out = folded(x)  # no encoder_hidden_states any more
    assert (out - ref).abs().max().item() <= 1e-5
    with pytest.raises(AdcError, match="no cross-attention"):
        fold_cross_attention(folded, ehs)
