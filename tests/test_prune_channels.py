"""prune_channels: exact on dead channels, ratios as asked, diffusers UNets/decoders still run."""

import copy
import json

import pytest
import torch
from torch import nn

from compress.errors import AdcError
from compress.prune import ChannelPruneConfig, prune_channels
from compress.zoo.sd import build_unet, build_vae


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _inputs(batch=1, text=32):
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.tensor([999]),
            "encoder_hidden_states": torch.randn(batch, 5, text, generator=g), "return_dict": False}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _zero(t, idx, dim):
    """Zero t's slices idx along dim; return how many parameters those slices hold."""
    with torch.no_grad():
        t.index_fill_(dim, torch.tensor(idx), 0.0)
    return t.numel() // t.shape[dim] * len(idx)


def _kill_resnet_groups(res, groups):
    """Make GroupNorm groups of conv1's outputs dead: conv1 rows, temb rows, norm2 affine, conv2 columns."""
    size = res.norm2.num_channels // res.norm2.num_groups
    idx = [g * size + i for g in groups for i in range(size)]
    n = _zero(res.conv1.weight, idx, 0) + _zero(res.conv1.bias, idx, 0)
    n += _zero(res.time_emb_proj.weight, idx, 0) + _zero(res.time_emb_proj.bias, idx, 0)
    n += _zero(res.norm2.weight, idx, 0) + _zero(res.norm2.bias, idx, 0)
    return n + _zero(res.conv2.weight, idx, 1)


def _kill_geglu_pairs(ff, pairs):
    proj, out = ff.net[0].proj, ff.net[2]
    inner = proj.out_features // 2
    rows = list(pairs) + [j + inner for j in pairs]
    return _zero(proj.weight, rows, 0) + _zero(proj.bias, rows, 0) + _zero(out.weight, list(pairs), 1)


def _kill_head_dims(attn, dims=None, heads=None):
    hd = attn.to_q.out_features // attn.heads
    if heads is not None:
        idx = [h * hd + d for h in heads for d in range(hd)]
    else:
        idx = [h * hd + d for h in range(attn.heads) for d in dims]
    n = sum(_zero(getattr(attn, r).weight, idx, 0) for r in ("to_q", "to_k", "to_v"))
    return n + _zero(attn.to_out[0].weight, idx, 1)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_dead_channels_prune_exactly(importance):
    torch.manual_seed(0)
    unet = build_unet("tiny")
    res = unet.down_blocks[1].resnets[0]
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    cross = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    removed = _kill_resnet_groups(res, [2, 5])             # 2 of 8 GroupNorm groups
    removed += _kill_geglu_pairs(block.ff, range(0, 128, 4))  # 32 of 128 inner channels
    removed += _kill_head_dims(attn, dims=[1, 5, 9, 13])   # 4 of 16 dims in each of 4 heads
    removed += _kill_head_dims(cross, dims=[0, 2, 4, 6])
    inputs = _inputs()
    ref = _run(unet, inputs)
    dense = copy.deepcopy(unet)
    cfg = ChannelPruneConfig(pruning_ratio=0.0, importance=importance, gn_policy="keep_group_size",
                             attention_scale="keep",
                             module_ratios={"down_blocks.1.resnets.0.conv1": 0.25,
                                            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": 0.25,
                                            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 0.25,
                                            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": 0.25})
    batches = lambda: [_inputs(2), _inputs(2)]  # noqa: E731
    pruned, rec = prune_channels(unet, cfg, inputs, importance_batches=batches)
    assert torch.equal(_run(unet, inputs), ref)  # the caller's model is left as it was (a copy is pruned)
    res, block = pruned.down_blocks[1].resnets[0], pruned.down_blocks[0].attentions[0].transformer_blocks[0]
    attn = pruned.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    out = _run(pruned, inputs)
    assert (out - ref).abs().max().item() <= 1e-5
    assert rec.params_before - rec.params_after == removed
    assert (res.conv1.out_channels, res.norm2.num_groups, res.norm2.num_channels) == (48, 6, 48)  # group size 8 kept
    assert block.ff.net[0].proj.out_features == 2 * 96 and block.ff.net[2].in_features == 96
    assert (attn.heads, attn.to_q.out_features, attn.scale) == (4, 48, pytest.approx(16**-0.5))
    assert type(attn.processor).__name__ == "ScaledSDPAProcessor"
    pruned_groups = [g for g in rec.extra["groups"] if g["pruned"]]
    assert len(pruned_groups) == 4 and all(g["pattern"] for g in pruned_groups)
    if importance == "taylor":
        assert rec.extra["importance_batches"] == 2
    json.dumps(rec.to_dict())
    # exactly the dead channels went: the survivors are the dense rows of the live ones
    live = [c for c in range(64) if c // 8 not in (2, 5)]
    assert torch.equal(res.conv1.weight, dense.down_blocks[1].resnets[0].conv1.weight[live])
    live = [j for j in range(128) if j % 4] + [128 + j for j in range(128) if j % 4]
    assert torch.equal(block.ff.net[0].proj.weight, dense.down_blocks[0].attentions[0].transformer_blocks[0]
                       .ff.net[0].proj.weight[live])


def test_dead_heads_prune_exactly_in_heads_mode():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    attn = unet.up_blocks[1].attentions[2].transformer_blocks[0].attn1
    removed = _kill_head_dims(attn, heads=[2])
    inputs = _inputs()
    ref = _run(unet, inputs)
    cfg = ChannelPruneConfig(pruning_ratio=0.0, attention="heads",
                             module_ratios={"up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v": 0.25})
    pruned, rec = prune_channels(unet, cfg, inputs, inplace=True)
    assert pruned is unet and (_run(pruned, inputs) - ref).abs().max().item() <= 1e-5
    assert (attn.heads, attn.to_q.out_features, attn.scale) == (3, 48, pytest.approx(16**-0.5))
    assert rec.params_before - rec.params_after == removed


def test_uniform_ratio_geglu_heads_groupnorm_widths():
    unet = build_unet("tiny")
    unet.enable_gradient_checkpointing()  # must be off while tracing (it hides the layers) and back on after
    inputs = _inputs()
    pruned, rec = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25), inputs)
    assert pruned.is_gradient_checkpointing
    for name, m in pruned.named_modules():
        if name.endswith("ff.net.0"):  # GEGLU: inner width cut by 25 %, not 50 %
            inner = 128 if name.startswith(("down_blocks.0", "up_blocks.3")) else 256
            assert m.proj.out_features == 2 * int(0.75 * inner) and pruned.get_submodule(
                name[:-1] + "2").in_features == int(0.75 * inner), name
        if name.endswith(("attn1", "attn2")):
            assert m.to_q.out_features // m.heads == 12 and m.heads in (2, 4), name  # head size 16 -> 12
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 8 and m.num_channels % 8 == 0, name  # keep_groups (default)
        if type(m).__name__ in ("Downsample2D", "Upsample2D"):
            assert m.channels == m.conv.in_channels and m.out_channels == m.conv.out_channels
    assert pruned.conv_in.in_channels == 4 and pruned.conv_out.out_channels == 4  # interfaces
    assert pruned.conv_in.out_channels == 24
    assert 0.5 < rec.params_after / rec.params_before < 0.62  # ~ (0.75)^2 of the prunable part
    assert _run(pruned, inputs).shape == (1, 4, 16, 16)
    assert len(rec.extra["pruning_history"]) > 50


def test_slice_importance_keeps_leading_channels_of_each_structure():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    dense = copy.deepcopy(unet)
    pruned, _ = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25, importance="slice",
                                                        gn_policy="first_divisor"), _inputs())
    old_res, new_res = dense.down_blocks[1].resnets[1], pruned.down_blocks[1].resnets[1]
    assert torch.equal(new_res.conv1.weight, old_res.conv1.weight[:48, :48])
    old_a = dense.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    new_a = pruned.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    rows = [h * 16 + d for h in range(4) for d in range(12)]  # the first 12 dims of every head
    assert torch.equal(new_a.to_q.weight, old_a.to_q.weight[rows][:, :48])
    old_p = dense.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[0].proj
    new_p = pruned.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[0].proj
    rows = list(range(192)) + list(range(256, 256 + 192))  # first 192 of each GEGLU half
    assert torch.equal(new_p.weight, old_p.weight[rows][:, :48])


def test_round_to_skips_groupnorm_groups():
    pruned, _ = prune_channels(build_unet("tiny"), ChannelPruneConfig(pruning_ratio=0.25, round_to=64), _inputs())
    assert pruned.down_blocks[0].resnets[0].conv1.out_channels == 24  # GroupNorm-coupled: 32 -> 24, not rounded
    ff = pruned.down_blocks[0].attentions[0].transformer_blocks[0].ff
    assert ff.net[2].in_features == 64  # no GroupNorm: 128 -> 96 -> rounded down to 64
    assert pruned.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2].in_features == 192


def test_tiny_vae_decoder_keep_group_size():
    torch.manual_seed(0)
    decoder = build_vae("tiny").decoder
    z = torch.randn(1, 4, 8, 8)
    pruned, rec = prune_channels(decoder, ChannelPruneConfig(pruning_ratio=0.25, gn_policy="keep_group_size"), z)
    with torch.no_grad():
        assert pruned(z).shape == (1, 3, 64, 64)
    assert pruned.conv_in.in_channels == 4 and pruned.conv_out.out_channels == 3
    for name, m in pruned.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels // m.num_groups in (2, 4), name  # group sizes of the dense decoder kept
    attn = pruned.mid_block.attentions[0]
    assert attn.heads == 1 and attn.to_q.out_features == 24
    assert rec.params_after < 0.65 * rec.params_before


def test_sd15_style_unet_runs_after_pruning():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=24, attention_head_dim=8, use_linear_projection=False)  # SD 1.5: 8 heads
    unet = UNet2DConditionModel(**cfg).eval()
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Conv2d)
    inputs = _inputs(text=24)
    for mode, heads, head_dim in (("head_dims", 8, 3), ("heads", 6, 4)):
        pruned, _ = prune_channels(copy.deepcopy(unet), ChannelPruneConfig(pruning_ratio=0.25, attention=mode), inputs)
        attn = pruned.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert (attn.heads, attn.to_q.out_features // attn.heads) == (heads, head_dim)
        assert pruned.down_blocks[0].attentions[0].proj_in.out_channels == 24
        assert _run(pruned, inputs).shape == (1, 4, 16, 16)


def test_config_and_user_errors():
    with pytest.raises(AdcError, match=r"prune.pruning_ratio"):
        ChannelPruneConfig.from_dict({"pruning_ratio": 1.0})
    with pytest.raises(AdcError, match=r"prune.pruning_ratio"):
        prune_channels(build_unet("tiny"), ChannelPruneConfig(pruning_ratio=-0.1), _inputs())
    with pytest.raises(AdcError, match=r"prune.ratio: unknown key"):
        ChannelPruneConfig.from_dict({"ratio": 0.2})
    with pytest.raises(AdcError, match=r"prune.module_ratios.\*conv1"):
        ChannelPruneConfig.from_dict({"module_ratios": {"*conv1": 1.5}})
    with pytest.raises(AdcError, match=r"prune.gn_policy"):
        ChannelPruneConfig.from_dict({"gn_policy": "groups"})
    unet = build_unet("tiny")
    with pytest.raises(AdcError, match=r"'nothing\.\*' matches no module"):
        prune_channels(unet, {"module_ratios": {"nothing.*": 0.2}}, _inputs())
    with pytest.raises(AdcError, match=r"'conv_out'"):
        prune_channels(unet, {"module_ratios": {"conv_out": 0.2}}, _inputs())
    with pytest.raises(AdcError, match="importance_batches"):
        prune_channels(unet, {"importance": "taylor"}, _inputs())
    assert unet.conv_in.out_channels == 32  # nothing was pruned by the refused calls


def test_conv_less_sampler_width_follows_its_input_and_replays():
    from diffusers.models.downsampling import Downsample2D

    from compress.prune import apply_history

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.down, self.b = nn.Conv2d(3, 16, 3, padding=1), Downsample2D(16), nn.Conv2d(16, 3, 1)

        def forward(self, x):
            return self.b(self.down(self.a(x)))

    x = torch.randn(1, 3, 8, 8)
    cfg = ChannelPruneConfig(pruning_ratio=0.25, interfaces={"a": "in", "b": "out"})
    pruned, rec = prune_channels(Toy(), cfg, x)
    assert (pruned.a.out_channels, pruned.down.channels, pruned.b.out_channels) == (12, 12, 3)
    again = apply_history(Toy(), rec)
    assert again.down.channels == 12 and again(x).shape == (1, 3, 4, 4)


@pytest.mark.slow
def test_full_sd21_unet_on_meta_structure_aware_slice():
    """SD 2.1's UNet without conditioning, 25 % per dependency group, AdcSR's GroupNorm rule (~45 s)."""
    from compress.prune import remove_conditioning

    unet, _ = remove_conditioning(build_unet("full", "meta"))
    x = torch.zeros(1, 4, 64, 64, device="meta")
    cfg = ChannelPruneConfig(pruning_ratio=0.25, importance="slice", gn_policy="first_divisor")
    pruned, rec = prune_channels(unet, cfg, x)
    assert [pruned.down_blocks[i].resnets[0].conv1.out_channels for i in range(4)] == [240, 480, 960, 960]
    attn = pruned.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.to_q.out_features) == (5, 240)  # 5 heads of 48
    assert pruned.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].in_features == 960
    assert round(rec.params_before / 1e6, 2) == 787.66 and round(rec.params_after / 1e6, 2) == 443.13


def test_groupnorm_policy_that_cannot_hold_is_refused_before_cutting():
    from compress.prune import remove_conditioning, slice_width

    unet, _ = slice_width(remove_conditioning(build_unet("tiny"))[0], 0.75)  # AdcSR widths, first-divisor groups
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    # the level-3 stream (48 channels) feeds GroupNorms of 24 and of 32 groups: no common chunking
    with pytest.raises(AdcError, match=r"48 channels .*keep_groups.*first_divisor"):
        prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25, gn_policy="keep_groups"),
                       torch.randn(1, 3, 16, 16))  # conv_in sliced 4 -> 3 (not widened here)
    assert {k: v.shape for k, v in unet.state_dict().items()} == shapes


def test_softmax_temperature_policy_on_head_dim_pruning():
    """'keep' keeps 1/sqrt(16): dead dims go exactly; 'sdpa' moves to 1/sqrt(12): the output shifts."""
    torch.manual_seed(0)
    unet = build_unet("tiny")
    _kill_head_dims(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1, dims=[1, 5, 9, 13])
    inputs = _inputs()
    ref = _run(unet, inputs)
    ratios = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 0.25}
    diffs = {}
    for policy in ("keep", "sdpa"):
        cfg = ChannelPruneConfig(pruning_ratio=0.0, attention_scale=policy, module_ratios=ratios)
        pruned, rec = prune_channels(copy.deepcopy(unet), cfg, inputs)
        attn = pruned.down_blocks[1].attentions[0].transformer_blocks[0].attn1
        assert attn.scale == pytest.approx((16 if policy == "keep" else 12) ** -0.5)
        diffs[policy] = (_run(pruned, inputs) - ref).abs().max().item()
        assert rec.extra["policies"]["attention_scale"] == policy
    assert diffs["keep"] <= 1e-5 < 1e-4 < diffs["sdpa"]
