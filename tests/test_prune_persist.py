"""save_compressed / load_compressed: one-call round trip with identical outputs."""

import copy
import json

import pytest
import torch

from compress.errors import AdcError
from compress.prune import (ChannelPruneConfig, apply_history, base_model, fold_timestep, load_compressed,
                            presliced_width, prune_channels, remove_conditioning, remove_modules, save_compressed,
                            slice_width, widen_module)
from compress.prune.persist import RECORD, WEIGHTS


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([999]),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=g), "return_dict": False}


def test_adcsr_chain_round_trip(tmp_path):
    torch.manual_seed(0)
    unet, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    unet, r1 = remove_conditioning(unet)
    unet, r2 = widen_module(unet, "conv_in", in_channels=presliced_width(12, 0.75))
    unet, r3 = widen_module(unet, "conv_out", out_channels=presliced_width(16, 0.75))
    unet, r4 = slice_width(unet, 0.75)
    x = torch.randn(1, 12, 16, 16)
    unet, r5 = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25, gn_policy="first_divisor",
                                                       attention_scale="keep"), x)
    out = save_compressed(unet, [r0, r1, r2, r3, r4, r5], tmp_path / "student")
    assert sorted(p.name for p in out.iterdir()) == [RECORD, WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary left behind
    meta = json.loads((out / RECORD).read_text())
    assert [c["op"] for c in meta["chain"]] == ["base", "remove_conditioning", "widen_module", "widen_module",
                                                "slice_width", "prune_channels"]
    assert meta["chain"][-1]["extra"]["pruning_history"]
    loaded = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(x), unet(x))
    attn = loaded.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert type(attn.processor).__name__ == "ScaledSDPAProcessor"  # temperature kept after reload


def test_pruned_diffusers_unet_round_trip_where_save_pretrained_fails(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    inputs = _unet_inputs()
    unet, r1 = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25), inputs)
    assert tuple(unet.config.block_out_channels) == (32, 64, 64, 64)  # stale: still the dense widths
    unet.save_pretrained(tmp_path / "hf")
    with pytest.raises(Exception, match="size mismatch|shape"):
        UNet2DConditionModel.from_pretrained(tmp_path / "hf")

    save_compressed(unet, [r0, r1], tmp_path / "ours", verify=False)
    loaded = load_compressed(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], unet(**inputs)[0])


def test_fold_then_prune_with_custom_forward_round_trip(tmp_path):
    torch.manual_seed(0)
    unet, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    unet, r1 = fold_timestep(unet, 999)
    ehs = torch.randn(1, 5, 32)
    x = torch.randn(1, 4, 16, 16)
    fwd = lambda m, inp: m(inp, encoder_hidden_states=ehs)  # noqa: E731
    unet, r2 = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25), x, forward_fn=fwd)
    assert r2.extra["trace"] is None  # a custom forward: the rebuild uses the recorded shapes
    save_compressed(unet, [r0, r1, r2], tmp_path / "m", verify=False)
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x, encoder_hidden_states=ehs), unet(x, encoder_hidden_states=ehs))


def test_history_replays_pruned_weights_from_dense():
    torch.manual_seed(0)
    unet, _ = base_model("compress.zoo.sd:build_unet", size="tiny")
    dense = copy.deepcopy(unet)
    pruned, rec = prune_channels(unet, ChannelPruneConfig(pruning_ratio=0.25, importance="magnitude"),
                                 _unet_inputs())
    again = apply_history(dense, rec)
    a, b = pruned.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unreplayable_or_incomplete_chains_are_refused(tmp_path):
    model, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    model, r1 = remove_modules(model, "conv_act", torch.nn.SiLU())
    with pytest.raises(AdcError, match="ModuleSpec"):
        save_compressed(model, [r0, r1], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model, r2 = remove_conditioning(model, ["cross_attention"])
    with pytest.raises(AdcError, match="attn2"):
        save_compressed(model, [r0], tmp_path / "x")  # the record of a change is missing
    with pytest.raises(AdcError, match="base"):
        save_compressed(model, [r2], tmp_path / "x")
    with pytest.raises(AdcError, match="only targets under"):
        base_model("os:system")
    with pytest.raises(AdcError, match=RECORD):
        load_compressed(tmp_path)


def test_overwrite_and_tampered_weights(tmp_path):
    from compress.io import load_safetensors, save_safetensors

    model, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    model, r1 = remove_conditioning(model)
    save_compressed(model, [r0, r1], tmp_path / "m")
    save_compressed(model, [r0, r1], tmp_path / "m")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    state = load_safetensors(tmp_path / "m" / WEIGHTS)
    state["conv_in.weight"] = state["conv_in.weight"][:5]
    save_safetensors(state, tmp_path / "m" / WEIGHTS)
    with pytest.raises(AdcError, match="conv_in.weight"):
        load_compressed(tmp_path / "m")


def test_save_pretrained_keeps_the_records_and_names_a_missing_base(tmp_path):
    from compress.prune import from_pretrained, load_records, save_pretrained

    torch.manual_seed(0)
    unet, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    small, r1 = remove_conditioning(unet)
    save_pretrained(small, tmp_path / "a", [r1], base=unet)  # the dense original, recorded by its config
    save_pretrained(small, tmp_path / "b", [r0, r1])  # or a chain that starts with its base record
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "a")(x), small(x))
        assert torch.equal(from_pretrained(tmp_path / "b")(x), small(x))
    assert [r.op for r in load_records(tmp_path / "a")] == ["base", "remove_conditioning"]
    assert load_records(tmp_path / "a")[1].to_dict() == json.loads(json.dumps(r1.to_dict()))
    for records, base, msg in (([r1], None, "base=<the dense original model>"),
                               ([r0, r1], unet, "already start with a 'base' record"),
                               ([r1], torch.nn.Conv2d(1, 1, 1), "no diffusers config")):
        with pytest.raises(AdcError, match=msg):
            save_pretrained(small, tmp_path / "c", records, base=base)
    assert not (tmp_path / "c").exists()
