"""compress.analysis on a tiny OSEDiff (random weights, CPU): what each prompt policy makes removable,
foldable, prunable or keep, the torch-pruning groups, and that the summary adds up."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from compress.analysis import TaskFacts, analyse
from compress.errors import AdcError
from compress.families import get
from compress.zoo.osediff import OSEDIFF_TINY


def osediff_facts(prompt: str) -> TaskFacts:
    return get("osediff").facts(prompt, 999)


LR = {"lr": torch.zeros(1, 3, 32, 32)}
ATTN2 = re.compile(r"^unet\..*transformer_blocks\.\d+\.attn2$")
NORM2 = re.compile(r"^unet\..*transformer_blocks\.\d+\.norm2$")
TEMB_PROJ = re.compile(r"^unet\..*resnets\.\d+\.time_emb_proj$")


@pytest.fixture(scope="module")
def osediff(one_thread_module):
    from compress.zoo import build

    return build("osediff", "tiny", "cpu")


@pytest.fixture(scope="module")
def dropped(osediff):
    return analyse(osediff, osediff_facts("dropped"), LR, model="osediff tiny", device=None)


def _cls(a, name: str) -> str:
    return a.row(name).classification


def _names(a, pattern: re.Pattern) -> list[str]:
    return [r.module for r in a.rows if pattern.match(r.module)]


def test_dropped_prompt_removes_prompt_path_and_cross_attention(dropped):
    assert _cls(dropped, "text_encoder") == "removable"
    assert _cls(dropped, "prompt_extractor") == "removable"
    attn2, norm2 = _names(dropped, ATTN2), _names(dropped, NORM2)
    assert len(attn2) == 16 and len(norm2) == 16  # SD 2.1 layout: 6 down + 1 mid + 9 up transformer blocks
    assert all(_cls(dropped, n) == "removable" for n in attn2 + norm2)
    assert "mixes the dropped prompt" in dropped.row(attn2[0]).reason
    # the image path around them stays: self-attention and the feed-forward are prunable
    block = attn2[0].rsplit(".", 1)[0]
    assert _cls(dropped, f"{block}.attn1.to_q") == "prunable"
    assert _cls(dropped, f"{block}.ff.net.2") == "prunable"


def test_dropped_prompt_time_path_is_foldable_into_conv1_bias(dropped):
    assert _cls(dropped, "unet.time_embedding") == "foldable"
    projs = _names(dropped, TEMB_PROJ)
    assert len(projs) == 22
    assert all(_cls(dropped, n) == "foldable" for n in projs)
    reason = dropped.row("unet.down_blocks.1.resnets.0.time_emb_proj").reason
    assert "bias of unet.down_blocks.1.resnets.0.conv1" in reason and "delete" in reason


def test_vae_encoder_is_a_replaceable_re_encoder(dropped):
    assert _cls(dropped, "vae.encoder") == "removable"
    assert _cls(dropped, "vae.quant_conv") == "removable"
    re_ = dropped.info["re_encoder"]
    assert re_["modules"] == ["vae.encoder", "vae.quant_conv"] and re_["into"] == "unet.sample"
    assert "PixelUnshuffle(2)" in re_["replacement"] and "12x16x16" in re_["replacement"]
    assert re_["also_used_by"]  # OSEDiff re-uses the latent in its x0 formula


def test_unet_convs_prunable_and_interfaces_kept(dropped):
    for n in ("unet.down_blocks.0.resnets.0.conv1", "unet.down_blocks.1.resnets.1.conv2",
              "unet.up_blocks.1.resnets.0.conv1", "unet.up_blocks.3.resnets.2.conv_shortcut",
              "unet.down_blocks.0.downsamplers.0.conv", "unet.up_blocks.0.upsamplers.0.conv",
              "vae.decoder.up_blocks.0.resnets.0.conv1"):
        assert _cls(dropped, n) == "prunable", n
        assert dropped.row(n).groups  # listed with its groups
    for n in ("unet.conv_in", "unet.conv_out", "vae.decoder.conv_in", "vae.decoder.conv_out"):
        assert _cls(dropped, n) == "keep", n
    latent = OSEDIFF_TINY.unet_overrides["in_channels"]  # the tiny teacher's latent width
    assert f"{latent} input channels" in dropped.row("unet.conv_in").reason
    assert "3 output channels" in dropped.row("vae.decoder.conv_out").reason


def test_skip_concat_group_spans_down_and_up_blocks(dropped):
    skips = [g for g in dropped.groups if "skip-concat" in g.tags]
    assert skips
    g = skips[0]
    names = g.layer_names()
    assert any(n.startswith("unet.down_blocks.") for n in names)
    assert any(n.startswith("unet.up_blocks.") for n in names)
    # the up-block conv takes the skip at an offset of its concatenated input
    sliced = [layer for layer in g.layers if layer.dim == "in" and layer.count < layer.size]
    assert sliced and not all(layer.ranges.startswith("0:") for layer in sliced)


def test_geglu_proj_appears_with_both_halves(dropped):
    glu = [g for g in dropped.groups if "geglu-halves" in g.tags]
    assert len(glu) == 16
    g = glu[0]
    proj = next(layer for layer in g.layers if layer.name.endswith("ff.net.0.proj"))
    out = next(layer for layer in g.layers if layer.name.endswith("ff.net.2"))
    assert proj.dim == "out" and out.dim == "in"
    assert proj.chunks == 2 and proj.count == 2 * out.count == proj.size
    inner = out.count
    assert proj.ranges == f"0:{inner},{inner}:{2 * inner}"


def test_attention_heads_and_groupnorm_tagged(dropped):
    heads = [g for g in dropped.groups if "attention-heads" in g.tags]
    assert heads and any("heads x" in n for n in heads[0].notes)
    assert {layer.name.rsplit(".", 1)[-1] for layer in heads[0].layers} >= {"to_q", "to_k", "to_v"}
    assert any("groupnorm" in g.tags for g in dropped.groups)
    # removed cross-attention q/k/v get no group of their own
    assert not any(re.search(r"attn2\.to_[qkv]$", g.root) for g in dropped.groups)


def test_summary_adds_up(dropped, osediff):
    s = dropped.summary().set_index("class")
    total = sum(p.numel() for p in {id(p): p for p in osediff.parameters()}.values())
    assert s.loc["total", "params"] == total
    assert sum(s.loc[c, "params"] for c in ("removable", "foldable", "prunable", "keep")) == total
    macs = sum(s.loc[c, "macs"] for c in ("removable", "foldable", "prunable", "keep", "(outside modules)"))
    assert macs == s.loc["total", "macs"] == dropped.info["macs_total"] > 0
    assert s.loc["removable", "params"] > 0 and s.loc["prunable", "macs"] > 0
    df = dropped.to_frame()
    assert {"module", "cls", "params", "macs", "classification", "reason"} <= set(df.columns)
    assert set(df["classification"]) <= {"removable", "foldable", "prunable", "keep"}
    assert (df["reason"].str.len() > 0).all()


def test_fixed_prompt_folds_text_encoder(osediff):
    a = analyse(osediff, osediff_facts("fixed"), LR, device=None, prune=False, macs=False)
    assert _cls(a, "text_encoder") == "foldable"
    assert _cls(a, "prompt_extractor") == "removable"
    block = _names(a, ATTN2)[0]
    assert _cls(a, block) != "removable"
    assert _cls(a, f"{block}.to_k") == "foldable" and _cls(a, f"{block}.to_v") == "foldable"
    assert _cls(a, f"{block}.to_q") != "foldable"
    assert _cls(a, "unet.time_embedding") == "foldable"


def test_variable_prompt_keeps_text_encoder(osediff):
    a = analyse(osediff, osediff_facts("variable"), LR, device=None, prune=False, macs=False)
    assert _cls(a, "text_encoder") == "keep" and "variable" in a.row("text_encoder").reason
    assert _cls(a, "prompt_extractor") == "keep"
    block = _names(a, ATTN2)[0]
    assert _cls(a, block) not in ("removable", "foldable")
    assert "input interface" in a.row(f"{block}.to_k").reason  # its width is the text encoder's


def test_single_index_probe_matches_torch_pruning_full_probe(one_thread_module):
    from compress.zoo import sd

    unet = sd.build_unet("tiny", "cpu")
    inp = {"sample": torch.zeros(1, 4, 16, 16), "timestep": torch.tensor([999]),
           "encoder_hidden_states": torch.zeros(1, 77, 32)}
    from compress.analysis import unet_facts

    def key(a):
        return sorted((g.root, g.channels, tuple(g.tags), tuple(sorted((layer.name, layer.dim, layer.count, layer.size,
                                                                         layer.ranges) for layer in g.layers)))
                      for g in a.groups)

    single = analyse(unet, unet_facts("variable"), inp, device=None)
    full = analyse(unet, unet_facts("variable"), inp, device=None, probe="full")
    assert len(single.groups) > 50 and key(single) == key(full)


class _WordTokenizer:
    """A CLIP-tokenizer stand-in: hashes words to ids (no vocabulary files offline)."""

    def __call__(self, prompts, max_length=77, padding=None, truncation=None, return_tensors=None):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: max_length - 2]):
                ids[i, j + 1] = 1 + sum(map(ord, w)) % 400

        class Out:
            input_ids = ids

        return Out()


def test_osediff_with_dape_running_bridges_tags_to_text_encoder(osediff):
    """The tags are strings: the declared edge, not tensor dataflow, links DAPE to the text encoder."""
    m = osediff
    m.set_prompting(tokenizer=_WordTokenizer(), tag_list=[f"tag{i}" for i in range(m.prompt_extractor.config.num_classes)])
    try:
        _dape_checks(m)
    finally:
        m.set_prompting(None, None)


def _dape_checks(m) -> None:
    lr = {"lr": torch.zeros(1, 3, 32, 32)}
    var = analyse(m, osediff_facts("variable"), lr, device=None, prune=False, macs=False)
    assert var.row("prompt_extractor").calls > 0
    assert var.row("prompt_extractor").classification == "keep"
    assert var.row("prompt_extractor.visual_encoder").classification == "keep"  # live through the edge
    assert var.row("prompt_extractor.tag_encoder").classification == "removable"  # RAM's captioner: never run
    assert var.row("text_encoder").classification == "keep"
    dropped = analyse(m, osediff_facts("dropped"), lr, device=None, prune=False, macs=False)
    assert dropped.row("prompt_extractor").classification == "removable"
    assert dropped.row("text_encoder").classification == "removable"


def test_bad_inputs_raise_adc_error():
    with pytest.raises(AdcError, match="int"):
        analyse(42, TaskFacts(), LR)
    with pytest.raises(AdcError, match="Linear.*not a pipeline"):
        analyse(nn.Linear(2, 2), TaskFacts(), LR)
    with pytest.raises(AdcError, match="variable input"):
        analyse(nn.Sequential(nn.Linear(2, 2)), TaskFacts(), {"x": torch.zeros(1, 2)})
    with pytest.raises(AdcError, match="prompt policy"):
        TaskFacts(prompt="sometimes")
