"""compress.analysis beyond OSEDiff's default call: a bare SD-1.5-style UNet (traced on meta), an
S3Diff-shaped pipeline."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compress.analysis import analyse, unet_facts
from compress.families import get


def test_sd15_style_unet_on_meta():
    """SD 1.5 layout at tiny width: 8 heads, conv proj_in/proj_out, 768 -> 24-wide text; traced on meta."""
    from compress.zoo import sd

    unet = sd.build_unet("tiny", "meta", attention_head_dim=8, use_linear_projection=False, cross_attention_dim=24)
    inp = {"sample": torch.zeros(1, 4, 16, 16), "timestep": torch.tensor([999]),
           "encoder_hidden_states": torch.zeros(1, 77, 24)}
    a = analyse(unet, unet_facts("dropped"), inp)
    assert a.info["trace_device"] == "meta" and a.info["macs_total"] > 0
    cls = {r.module: r.classification for r in a.rows}
    assert cls["unet.conv_in"] == "keep" and cls["unet.conv_out"] == "keep"
    assert cls["unet.time_embedding"] == "foldable"
    assert cls["unet.down_blocks.0.resnets.0.time_emb_proj"] == "foldable"
    attn2 = [n for n in cls if n.endswith(".attn2")]
    assert len(attn2) == 16 and all(cls[n] == "removable" for n in attn2)
    # 1x1 conv projections (use_linear_projection=False) are prunable layers of the residual stream
    assert a.row("unet.down_blocks.0.attentions.0.proj_in").cls == "Conv2d"
    assert cls["unet.down_blocks.0.attentions.0.proj_in"] == "prunable"
    assert not a.info["re_encoder"]  # the sample is the pipeline input: nothing to replace
    heads = [g for g in a.groups if "attention-heads" in g.tags]
    assert heads and "8 heads x 4" in heads[0].notes[-1]
    assert any("skip-concat" in g.tags for g in a.groups)


@pytest.mark.skipif(importlib.util.find_spec("compress.zoo.s3diff") is None, reason="compress/zoo/s3diff.py absent")
def test_s3diff_shaped_pipeline(one_thread_module):
    from compress.zoo import build

    m = build("s3diff", "tiny", "cpu")
    a = analyse(m, get("s3diff").facts("fixed", 999), {"lr": torch.zeros(1, 3, 32, 32)}, device=None, macs=False)
    cls = {r.module: r.classification for r in a.rows}
    assert cls["text_encoder"] == "foldable"  # fixed positive/negative prompt
    # The degradation estimator also drives the UNet's LoRA: shared, not part of the re-encoder.
    assert a.info["re_encoder"]["modules"] == ["vae.encoder", "vae.quant_conv"]
    assert cls["de_net"] != "removable" and cls["guidance"] != "removable"
    assert "also reads" in a.row("vae.encoder").reason
    # to_k reads the fixed prompt, but its LoRA reads the degradation matrices: not constant
    to_k = next(n for n in cls if n.endswith("attn2.to_k"))
    assert cls[to_k] != "foldable"
    # block embeddings are read as parameters, never called: constant, folded with their MLP
    assert cls["guidance.vae_block_embeddings"] == "foldable"
    assert "read(s) its parameters" in a.row("guidance.vae_block_embeddings").reason
    assert [b["traced_by"] for b in a.info["pruning_builds"] if b["scope"] == "unet"]
    assert any(r.classification == "prunable" for r in a.rows if r.module.startswith("unet.down_blocks"))
