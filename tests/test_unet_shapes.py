"""SD-1.5- and SDXL-shaped UNets through the plan: analyse -> remove / fold -> prune, exactly.

Tiny configs of our own with what those families have and SD 2.1 lacks: a conv ``proj_in``
(SD 1.5), an SDXL ``text_time`` added embedding, several transformer layers per block, no
attention at the top level, odd widths and head counts.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from compress.analysis import analyse, unet_facts
from compress.errors import AdcError
from compress.prune import ChannelPruneConfig, fold_timestep, prune_channels, remove_conditioning

pytestmark = pytest.mark.usefixtures("one_thread_module")

SD15 = dict(sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(24, 48, 72, 72),
            layers_per_block=2, attention_head_dim=8, cross_attention_dim=32, use_linear_projection=False,
            norm_num_groups=8)
SDXL = dict(sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(20, 40, 60),
            layers_per_block=2, attention_head_dim=(1, 5, 3), cross_attention_dim=32, transformer_layers_per_block=(1, 2, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=4)
TIME_IDS = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]


def _unet(cfg):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


def _inputs(cfg, text=None):
    inp = {"sample": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
           "timestep": torch.tensor([999]), "encoder_hidden_states": torch.zeros(1, 7, 32)}
    if cfg.get("addition_embed_type") == "text_time":
        inp["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 16) if text is None else text,
                                    "time_ids": torch.tensor([TIME_IDS])}
    return inp


def _facts(cfg):
    facts = unet_facts("dropped")
    if cfg.get("addition_embed_type") == "text_time":
        facts = replace(facts, constant={"timestep": 999, "time_ids": TIME_IDS})
    return facts


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def planned(request):
    cfg = {"sd15": SD15, "sdxl": SDXL}[request.param]
    unet = _unet(cfg)
    analysis = analyse(unet, _facts(cfg), _inputs(cfg), device=None)
    return request.param, cfg, unet, analysis


def test_the_plan_removes_cross_attention_and_folds_the_time_branch(planned):
    name, cfg, unet, analysis = planned
    part = analysis.plan.part("unet")
    folded, removed = part.names("fold"), part.names("remove")
    assert "time_embedding" in folded and sum(n.endswith(".time_emb_proj") for n in folded) > 6
    if name == "sdxl":
        assert {"add_embedding", "add_time_proj"} <= set(folded)  # constant time ids, pooled text dropped (zeros)
    n_attn2 = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn2"))
    assert sum(n.endswith(".attn2") for n in removed) == n_attn2 > 0
    assert part.interfaces == {"conv_in": "in", "conv_out": "out"}
    assert part.scope.graph is not None and len(part.scope.groups) > 10


def test_fold_is_exact_and_remove_follows_the_plan(planned):
    name, cfg, unet, analysis = planned
    part = analysis.plan.part("unet")
    inp = _inputs(cfg)
    m = copy.deepcopy(unet)
    text_time = {"time_ids": TIME_IDS, "text_embeds": None} if name == "sdxl" else None
    # cross-attention first (the plan removes it), then the time branch folded at t = 999
    m, _ = remove_conditioning(m, drop=("cross_attention",), planned=part.names("remove"))
    m, rec = fold_timestep(m, 999, text_time=text_time, planned=part.names("fold"))
    ref_free = copy.deepcopy(unet)
    ref_free, _ = remove_conditioning(ref_free, drop=("cross_attention",))
    with torch.no_grad():
        want = ref_free(**{**inp, "encoder_hidden_states": None}).sample  # the diffusers forward at t = 999
        got = m(inp["sample"])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert rec.args["timestep"] == 999
    # a plan that disagrees with the op is refused before anything changes
    with pytest.raises(AdcError, match="which the plan keeps"):
        remove_conditioning(copy.deepcopy(unet), drop=("cross_attention",), planned=part.names("remove")[2:])


def test_prune_channels_reuses_the_plans_graph(planned):
    name, cfg, unet, analysis = planned
    part = analysis.plan.part("unet")
    m = copy.deepcopy(unet)
    m, _ = remove_conditioning(m, drop=("time", "cross_attention"), planned=part.names("remove") + part.names("fold"))
    graph = analysis.plan.take_graph("unet", m)
    assert analysis.plan.take_graph("unet", m) is None  # handed out once
    cfg_p = ChannelPruneConfig(pruning_ratio=0.25, importance="magnitude", attention="head_dims",
                               interfaces={k: v for k, v in part.interfaces.items()})
    before = sum(p.numel() for p in m.parameters())
    x = torch.randn(1, 4, 16, 16)
    m, rec = prune_channels(m, cfg_p, x, graph=graph)
    assert rec.extra["graph"] == "the analysis plan's"
    after = sum(p.numel() for p in m.parameters())
    assert 0.4 < after / before < 0.8
    assert m.conv_in.in_channels == 4 and m.conv_out.out_channels == 4
    with torch.no_grad():
        assert m(x).shape == (1, 4, 16, 16)
    # the same pruning with a freshly traced graph gives the same shapes
    m2 = copy.deepcopy(unet)
    m2, _ = remove_conditioning(m2, drop=("time", "cross_attention"))
    m2, _ = prune_channels(m2, cfg_p, x)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
