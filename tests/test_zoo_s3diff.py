"""S3Diff: exact sizes, tiny forward, the de_mod LoRA maths, s3diff.pkl round trip and bad files."""

from __future__ import annotations

import os

import pytest
import torch

from compress.errors import AdcError
from compress.io import atomic_torch_save
from compress.zoo.construct import count_parameters
from compress.zoo.lora import load_plain_state_dict, lora_layers, lora_parameter_count, plain_key, set_lora_b
from compress.zoo.s3diff import (UNET_ADAPTER, build_s3diff, load_de_net, load_s3diff_pkl, s3diff_state_dict,
                                 unet_block_index, vae_block_index)

M = 1e6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared busy cores, 2 OpenMP threads run these tiny models ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_full_size_parameter_counts():
    m = build_s3diff("full", "meta")
    parts = m.components()
    lora_unet, lora_vae = lora_parameter_count(m.unet), lora_parameter_count(m.vae)
    counts = {
        "total": (count_parameters(m), 1326.8, 0.05),
        "unet base": (count_parameters(m.unet) - lora_unet, 865.91, 0.005),
        "vae base": (count_parameters(m.vae) - lora_vae, 83.65, 0.005),
        "text encoder": (count_parameters(parts["text_encoder"]), 340.39, 0.005),
        "UNet LoRA": (lora_unet, 32.43, 0.005),
        "VAE LoRA": (lora_vae, 1.48, 0.005),
        "DEResNet": (count_parameters(parts["de_net"]), 2.35, 0.005),
        "MLPs + embeddings": (count_parameters(parts["guidance"]), 0.55, 0.005),
    }
    bad = {k: round(v / M, 3) for k, (v, ref, rounding) in counts.items()
           if abs(v / M - ref) > max(1e-3 * ref, rounding)}
    assert not bad, bad
    assert len(lora_layers(m.unet)) == 257 and len(lora_layers(m.vae)) == 31
    assert not any("quant_conv" in n for n in lora_layers(m.vae))  # unlike OSEDiff's VAE LoRA
    assert "conv_in" not in lora_layers(m.unet) and m.unet.conv_in.weight.shape == (320, 4, 3, 3)
    assert count_parameters(m) == 1_326_767_133
    blocks = {unet_block_index(n) for n in lora_layers(m.unet)}
    assert blocks == set(range(10))
    assert {vae_block_index(n) for n in lora_layers(m.vae)} == set(range(6))


def _tiny(seed: int, trained: bool = False):
    torch.manual_seed(seed)
    m = build_s3diff("tiny").eval()
    if trained:
        g = torch.Generator().manual_seed(seed + 100)
        set_lora_b(m, std=0.1, generator=g)
        with torch.no_grad():
            for p in m.guidance.parameters():  # official init is 1e-5-scaled: make de_mod matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


@pytest.fixture(scope="module")
def trained():
    return _tiny(0, trained=True)


@pytest.fixture(scope="module")
def blank():
    """Another tiny S3Diff (other seed, official init): the loaders' target. peft makes builds slow, so one."""
    return _tiny(1)


@pytest.fixture(scope="module")
def lr():
    """Small on purpose (x4 -> 64 x 64): the round trips compare outputs, test_tiny_forward checks 32 -> 128."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.fixture(scope="module")
def embs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


@torch.no_grad()
def test_tiny_forward(trained, embs):
    lr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = trained(lr)  # empty-prompt tokens for both CFG branches, DEResNet scores from the LR
    assert out.shape == (2, 3, 128, 128) and torch.isfinite(out).all() and out.abs().max() <= 1
    odd = trained(lr[:1, :, :20, :28], *embs)  # x4 = 80 x 112: reflect-padded to 128 x 128, then cropped
    assert odd.shape == (1, 3, 80, 112) and torch.isfinite(odd).all()
    scores = trained.de_net((lr + 1) / 2)
    assert scores.shape == (2, 2) and ((scores > 0) & (scores < 1)).all()


@torch.no_grad()
def test_lora_layers_compute_b_of_de_mod_times_a(trained):
    """The hook gives peft's layer the official my_lora_fwd result: base(x) + B(A(x) . de_mod) * scale."""
    scores = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
    vae_mods, unet_mods = trained.guidance(scores)
    cases = [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", torch.randn(2, 5, 64)),
             ("unet", "up_blocks.1.resnets.0.conv1", torch.randn(2, 128, 4, 4)),
             ("vae", "encoder.mid_block.attentions.0.to_v", torch.randn(2, 6, 32))]
    for part, name, x in cases:
        model = trained.unet if part == "unet" else trained.vae
        layer = model.get_submodule(name)
        adapter = next(iter(layer.lora_A))
        block = unet_block_index(name) if part == "unet" else vae_block_index(name)
        mat = (unet_mods if part == "unet" else vae_mods)[:, block]
        with trained.modulated(scores):
            got = layer(x)
        a_out = layer.lora_A[adapter].forward(x)  # .forward: without the de_mod hook
        mixed = torch.einsum("blk,bkr->blr", a_out, mat) if x.dim() == 3 else torch.einsum("bkhw,bkr->brhw", a_out, mat)
        want = layer.base_layer(x) + layer.lora_B[adapter](mixed) * layer.scaling[adapter]
        assert torch.allclose(got, want, atol=1e-5), name
        assert not torch.allclose(got, layer.base_layer(x), atol=1e-4), name
    with pytest.raises(AdcError, match="degradation"):
        trained.unet.get_submodule(cases[0][1])(cases[0][2])  # outside an S3Diff pass: refused


@torch.no_grad()
def test_degradation_scores_and_cfg_matter(trained, lr, embs):
    pos, neg = embs
    low, high = torch.full((1, 2), 0.1), torch.full((1, 2), 0.9)
    base = trained.teacher_latent(lr, pos, neg, deg_score=low)
    assert not torch.allclose(base, trained.teacher_latent(lr, pos, neg, deg_score=high), atol=1e-4)
    # With identical prompts CFG is a no-op whatever the scale; with different ones the scale matters.
    same = trained.teacher_latent(lr, pos, pos, deg_score=low)
    old = trained.guidance_scale
    try:
        trained.guidance_scale = 3.0
        assert torch.allclose(trained.teacher_latent(lr, pos, pos, deg_score=low), same, atol=1e-4)
        assert not torch.allclose(trained.teacher_latent(lr, pos, neg, deg_score=low), base, atol=1e-4)
    finally:
        trained.guidance_scale = old


def _plain(module):
    return {plain_key(k): v for k, v in module.state_dict().items() if plain_key(k) is not None}


@torch.no_grad()
def test_s3diff_pkl_round_trip(trained, blank, lr, embs, tmp_path):
    pkl = atomic_torch_save(s3diff_state_dict(trained), tmp_path / "s3diff.pkl")
    de = atomic_torch_save(trained.de_net.state_dict(), tmp_path / "de_net.pth")
    sd = torch.load(pkl, weights_only=True)
    assert sd["rank_unet"] == 4 and sd["w"].shape == (8,)
    assert any(k.endswith(f"lora_A.{UNET_ADAPTER}.weight") for k in sd["state_dict_unet"])
    assert {"conv_in.weight", "conv_in.bias"} <= set(sd["state_dict_unet"])
    assert all(".lora_" in k and ".vae_skip." in k for k in sd["state_dict_vae"])
    # What loading the SD-Turbo directory does: same base weights, except conv_in (S3Diff trains it).
    load_plain_state_dict(blank.unet, _plain(trained.unet), "unet")
    load_plain_state_dict(blank.vae, _plain(trained.vae), "vae")
    blank.text_encoder.load_state_dict(trained.text_encoder.state_dict())
    blank.unet.conv_in.weight.mul_(0.9)
    ref = trained(lr, *embs)
    assert not torch.allclose(blank(lr, *embs), ref, atol=1e-3)
    load_s3diff_pkl(blank, pkl)
    load_de_net(blank, de)
    assert torch.equal(blank(lr, *embs), ref)


@pytest.mark.slow  # same path as OSEDiff's (tested by default) plus de_net.pth; ~5 s on busy cores
@torch.no_grad()
def test_load_s3diff_from_local_files(trained, lr, embs, tmp_path):
    """The real-weights path: SD-Turbo diffusers directory + s3diff.pkl + de_net.pth, nothing downloaded."""
    from compress.zoo.s3diff import S3DIFF_TINY, load_s3diff_weights
    from helpers import save_sd_dir

    save_sd_dir(trained, tmp_path / "turbo")
    pkl = atomic_torch_save(s3diff_state_dict(trained), tmp_path / "s3diff.pkl")
    de = atomic_torch_save(trained.de_net.state_dict(), tmp_path / "de_net.pth")
    model = load_s3diff_weights(tmp_path / "turbo", pkl, de, config=S3DIFF_TINY)
    assert torch.equal(model(lr, *embs), trained(lr, *embs))


def test_bad_s3diff_files(trained, blank):
    good = s3diff_state_dict(trained)
    model = blank
    cases = [({k: v for k, v in good.items() if k != "w"}, "missing key 'w'"),
             ({**good, "rank_vae": 16}, "rank_vae=16"),
             ({**good, "w": torch.zeros(3)}, "'w' has shape"),
             ({**good, "state_dict_unet_fuse_mlp": {"weight": torch.zeros(2, 2)}}, "lacks key 'bias'")]
    for bad, match in cases:
        with pytest.raises(AdcError, match=match) as info:
            load_s3diff_pkl(model, bad)
        assert "\n" not in str(info.value)
    # pix2pix-turbo's vestigial skip_conv tensors are tolerated and reported.
    extra = {**good, "state_dict_vae": {**good["state_dict_vae"], "encoder.skip_conv_1.weight": torch.zeros(1)}}
    assert load_s3diff_pkl(model, extra) == ["encoder.skip_conv_1.weight"]
    with pytest.raises(AdcError, match="lacks key"):
        load_de_net(model, {})


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_s3diff_pickle_is_refused(blank, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "s3diff.pkl"
    torch.save({"w": _Payload(marker)}, path)
    for loader in (load_s3diff_pkl, load_de_net):
        with pytest.raises(AdcError, match="refused"):
            loader(blank, path)
    assert not marker.exists()
