"""The structural ops are generic: the calls that build AdcSR also compress S3Diff's and an SD-1.5-style UNet."""

import pytest
import torch
from torch import nn

from compress.prune import count_params, remove_conditioning, slice_width, widen_module
from compress.zoo.sd import build_unet

KEEP = 0.75


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plain_s3diff_unet() -> nn.Module:
    """S3Diff's UNet without its peft LoRA layers, as a plain diffusers UNet.

    peft's ``unload()``/``merge_and_unload()`` are wrong here: S3Diff's LoRA is modulated per image,
    ``delta W = B . M(degradation) . A`` (a forward hook on ``lora_A`` mixes its r channels with the
    block's de_mod matrix), so there is no single static delta to merge; ``merge_and_unload`` would
    fold ``B . A`` (M = identity), a model S3Diff never runs. The input-independent part of S3Diff's
    UNet is the base layers: take the wrapped model's state dict, drop every ``lora_*`` tensor and
    rename ``<layer>.base_layer.<p>`` -> ``<layer>.<p>``; that is exactly a ``build_unet`` state dict
    of the same size, loaded strictly (any missing or extra key fails).
    """
    from compress.zoo.s3diff import build_s3diff

    torch.manual_seed(0)
    s3 = build_s3diff("tiny")
    wrapped = s3.unet.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in wrapped.items() if ".lora_" not in k}
    unet = build_unet(s3.config.sd_size)
    unet.load_state_dict(base, strict=True)
    assert any(".lora_" in k for k in wrapped) and not any("lora" in n for n, _ in unet.named_modules())
    key = "down_blocks.0.resnets.0.conv1"
    assert torch.equal(unet.state_dict()[f"{key}.weight"], wrapped[f"{key}.base_layer.weight"])
    return unet.eval()


def test_s3diff_unet_remove_widen_slice():
    unet = plain_s3diff_unet()
    dense = count_params(unet)
    unet, _ = remove_conditioning(unet)
    unet, _ = widen_module(unet, "conv_in", in_channels=16)   # presliced_width(12, 0.75)
    unet, _ = widen_module(unet, "conv_out", out_channels=24)
    unet, rec = slice_width(unet, KEEP)
    assert (unet.conv_in.in_channels, unet.conv_out.out_channels) == (12, 18)
    assert unet.down_blocks[0].resnets[0].conv1.out_channels == 24  # 32 -> 24
    assert not any(isinstance(m, nn.Linear) and "attn2" in n for n, m in unet.named_modules())
    assert rec.params_after == count_params(unet) < 0.6 * dense
    with torch.no_grad():
        out = unet(torch.randn(2, 12, 16, 16))
    assert out.shape == (2, 18, 16, 16) and torch.isfinite(out).all()


def test_sd15_style_unet_remove_slice():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
                                use_linear_projection=False).eval()  # SD 1.5: 8 heads, conv proj_in
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 8 and isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Conv2d)
    dense = count_params(unet)
    unet, _ = remove_conditioning(unet)
    unet, rec = slice_width(unet, KEEP)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.to_q.out_features) == (8, 24)  # heads kept, head dim 4 -> 3
    assert unet.down_blocks[0].attentions[0].proj_in.out_channels == 24
    assert (unet.conv_in.in_channels, unet.conv_out.out_channels) == (3, 3)  # interfaces sliced too
    assert rec.params_after == count_params(unet) < 0.6 * dense
    with torch.no_grad():
        out = unet(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
