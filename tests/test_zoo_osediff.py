"""OSEDiff and DAPE: exact sizes, tiny forward, official checkpoint layouts, safety, x0 maths."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch

from compress.errors import AdcError
from compress.io import atomic_torch_save
from compress.zoo.construct import count_parameters
from compress.zoo.dape import build_dape, load_ram_weights, official_state_dicts
from compress.zoo.lora import (load_plain_state_dict, lora_layers, lora_parameter_count, merge_and_unload, plain_key,
                               set_lora_b)
from compress.zoo.osediff import (OSEDIFF_TINY, UNET_ADAPTERS, OSEDiff, adcsr_osediff_state_dict, build_osediff,
                                  empty_prompt_ids, load_adcsr_osediff, load_osediff_pkl, osediff_state_dict)
from compress.zoo.sd import SD21_SCHEDULER, build_text_encoder, build_unet, build_vae, one_step_x0

M = 1e6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared busy cores, 2 OpenMP threads run these tiny models ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _close(value: int, ref_m: float, rel: float = 1e-3) -> bool:
    """Within 0.1 % of the reference, or within its printed rounding (1.78 M covers 1.775-1.785 M)."""
    decimals = len(repr(ref_m).partition(".")[2])
    return abs(value / M - ref_m) <= max(rel * ref_m, 0.5 * 10.0**-decimals)


@pytest.fixture(scope="module")
def full():
    return build_osediff("full", "meta")


def test_full_size_parameter_counts(full):
    parts = full.components()
    lora_unet = lora_parameter_count(full.unet)
    lora_vae = lora_parameter_count(full.vae)
    vae_base = count_parameters(full.vae) - lora_vae
    counts = {
        "total": (count_parameters(full), 1765.3),
        "unet base": (count_parameters(full.unet) - lora_unet, 865.91),
        "vae base": (vae_base, 83.65),
        "vae encoder base (+quant_conv)": (count_parameters(parts["vae.encoder"]) - lora_vae, 34.16),
        "vae decoder (+post_quant_conv)": (count_parameters(parts["vae.decoder"]), 49.49),
        "text encoder": (count_parameters(parts["text_encoder"]), 340.39),
        "DAPE": (count_parameters(parts["prompt_extractor"]), 470.93),
        "DAPE LoRA": (lora_parameter_count(full.prompt_extractor), 1.78),
        "DAPE tag path": (full.prompt_extractor.tag_path_parameters(), 212.7),
        "LoRA (UNet + VAE)": (lora_unet + lora_vae, 4.43),
        "UNet LoRA": (lora_unet, 4.056),
        "VAE LoRA": (lora_vae, 0.369),
    }
    bad = {k: (round(v / M, 3), ref) for k, (v, ref) in counts.items() if not _close(v, ref)}
    assert not bad, bad
    # The exact values measured with RAM's tying and OSEDiff's grep (regression guard).
    assert count_parameters(full) == 1_765_303_944
    assert count_parameters(full.prompt_extractor) == 470_926_449


def test_lora_module_selection_matches_osediff_grep(full):
    per_adapter = {a: len(full.unet_lora_modules[a]) for a in UNET_ADAPTERS}
    assert per_adapter == {"default_encoder": 94, "default_decoder": 148, "default_others": 16}
    assert len(lora_layers(full.unet)) == 94 + 148 + 16
    assert "conv_in" in full.unet_lora_modules["default_encoder"]
    assert "conv_out" in full.unet_lora_modules["default_decoder"]
    assert all(n.startswith("mid_block") for n in full.unet_lora_modules["default_others"])
    # VAE: 32 unique modules (the stored list repeats names, one entry per matching pattern, as OSEDiff's does).
    assert len(set(full.vae_lora_modules)) == 32 == len(lora_layers(full.vae))
    assert "quant_conv" in full.vae_lora_modules and "post_quant_conv" not in full.vae_lora_modules
    assert all(n.startswith("encoder.") or n == "quant_conv" for n in full.vae_lora_modules)
    # Every adapter is active (diffusers' add_adapter leaves only the last one on).
    layer = full.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert set(layer.active_adapters) == set(UNET_ADAPTERS)


@pytest.fixture(scope="module")
def lr():
    """Small on purpose (x4 -> 64 x 64): the round trips compare outputs, test_tiny_forward checks 32 -> 128."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.fixture(scope="module")
def emb():
    return torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))


def _tiny(seed: int, lora_std: float | None = None, dape: bool = False):
    """A tiny OSEDiff; without the (tiny) DAPE unless asked: tests pass prompt embeddings directly."""
    torch.manual_seed(seed)
    m = build_osediff(config=OSEDIFF_TINY if dape else replace(OSEDIFF_TINY, dape=None)).eval()
    if lora_std is not None:
        set_lora_b(m, std=lora_std, generator=torch.Generator().manual_seed(seed + 100))
    return m


def _plain(module):
    return {plain_key(k): v for k, v in module.state_dict().items() if plain_key(k) is not None}


@pytest.fixture(scope="module")
def trained():
    """A tiny OSEDiff whose LoRA does something (non-zero B)."""
    return _tiny(0, lora_std=0.05, dape=True)


@pytest.fixture(scope="module")
def blank():
    """Another tiny OSEDiff (other seed, fresh LoRA): the target of the loaders. peft makes builds slow, so one."""
    return _tiny(1)


@torch.no_grad()
def test_tiny_forward(trained):
    assert trained.prompt_extractor is not None
    lr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = trained(lr)  # no prompt: the fixed empty-prompt token sequence goes through CLIP
    assert out.shape == (2, 3, 128, 128)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert trained.teacher_latent(lr).shape == (2, 16, 16, 16)  # the tiny teacher's 16-channel latent
    ids = empty_prompt_ids()
    assert ids.shape == (1, 77) and ids[0, :3].tolist() == [49406, 49407, 0]
    with pytest.raises(AdcError):
        trained.encode_prompt(prompts=["a cat"])  # no tokenizer given: refused, never downloaded


@torch.no_grad()
def test_osediff_pkl_round_trip(trained, blank, lr, emb, tmp_path):
    path = atomic_torch_save(osediff_state_dict(trained), tmp_path / "osediff.pkl")
    sd = torch.load(path, weights_only=True)
    assert any(".lora_A.default_encoder.weight" in k for k in sd["state_dict_unet"])
    assert "conv_in.base_layer.weight" in sd["state_dict_unet"]
    assert not any("lora" not in k and "conv_in" not in k for k in sd["state_dict_unet"])
    # What loading the SD 2.1-base directory does: same base weights, except conv_in (OSEDiff trains it).
    load_plain_state_dict(blank.unet, _plain(trained.unet), "unet")
    load_plain_state_dict(blank.vae, _plain(trained.vae), "vae")
    blank.unet.conv_in.base_layer.weight.mul_(0.9)
    ref = trained(lr, emb)
    assert not torch.allclose(blank(lr, emb), ref, atol=1e-3)  # LoRA and conv_in matter
    load_osediff_pkl(blank, path)
    assert torch.equal(blank(lr, emb), ref)


@torch.no_grad()
def test_merged_lora_matches_and_adcsr_variant_round_trip(trained, lr, emb, tmp_path):
    ref = trained(lr, emb)
    path = atomic_torch_save(adcsr_osediff_state_dict(trained), tmp_path / "osediff_adcsr.pkl")
    sd = torch.load(path, weights_only=True)
    assert set(sd) == {"unet", "vae"} and "conv_in.weight" in sd["unet"]
    assert not any("lora" in k or "base_layer" in k for k in sd["unet"])
    # AdcSR's file: LoRA-merged weights, loaded strictly into plain diffusers modules.
    plain = OSEDiff(build_unet("tiny", **OSEDIFF_TINY.unet_overrides), build_vae("tiny", **OSEDIFF_TINY.vae_overrides),
                    build_text_encoder("tiny"), None,
                    replace(OSEDIFF_TINY, dape=None), add_lora=False).eval()
    assert not torch.allclose(plain(lr, emb), ref, atol=1e-3)
    load_adcsr_osediff(plain, path)
    assert (plain(lr, emb) - ref).abs().max() < 3e-5  # merged LoRA == unmerged LoRA (fp32 rounding)
    # merge_and_unload (what merge_lora does to both parts) on a copy of the VAE.
    vae = copy.deepcopy(trained.vae)
    assert merge_and_unload(vae) == len(lora_layers(trained.vae)) > 0 and not lora_layers(vae)
    up = trained.upscale(lr)
    assert (vae.encode(up).latent_dist.mode() - trained.vae.encode(up).latent_dist.mode()).abs().max() < 1e-5
    assert not torch.allclose(vae.encode(up).latent_dist.mode(), plain_vae_mode(trained, up), atol=1e-4)


def plain_vae_mode(model, image):
    """The VAE encoder with its LoRA switched off (to show the LoRA changes what merging keeps)."""
    model.vae.disable_adapters()
    try:
        return model.vae.encode(image).latent_dist.mode()
    finally:
        model.vae.enable_adapters()


class _FakeTokenizer:
    """Records prompts; returns fixed ids (a real CLIP tokenizer would come from a local SD directory)."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, prompts, max_length, padding, truncation, return_tensors):
        self.seen += prompts
        return type("Tok", (), {"input_ids": empty_prompt_ids(len(prompts), max_length)})()


@torch.no_grad()
def test_dape_prompt_path(trained):
    dape = trained.prompt_extractor
    tags = [f"tag{i}" for i in range(dape.config.num_classes)]
    tok = _FakeTokenizer()
    trained.set_prompting(tokenizer=tok, tag_list=tags)
    old = dape.class_threshold.clone()
    try:
        lr = torch.rand(1, 3, 16, 16) * 2 - 1
        dape.class_threshold.fill_(-1.0)  # every tag fires
        emb = trained.encode_prompt(lr=lr, user_prompt="clean")
        assert tok.seen == [", ".join(tags) + ", clean,"]  # OSEDiff's f"{tags}, {user_prompt},"
        assert emb.shape == (1, 77, 32)
        dape.class_threshold.fill_(2.0)  # none fires
        assert trained.dape_prompts(lr) == [", ,"]
    finally:
        dape.class_threshold.copy_(old)
        trained.set_prompting()


@torch.no_grad()
def test_load_osediff_from_local_sd_directory(trained, lr, emb, tmp_path):
    """The real-weights path: diffusers directory (unet/, vae/, text_encoder/) + osediff.pkl, nothing downloaded."""
    from compress.zoo.osediff import load_osediff_weights
    from helpers import save_sd_dir

    save_sd_dir(trained, tmp_path / "sd")
    pkl = atomic_torch_save(osediff_state_dict(trained), tmp_path / "osediff.pkl")
    config = replace(OSEDIFF_TINY, dape=None)
    model = load_osediff_weights(tmp_path / "sd", pkl, config=config)
    assert model.prompt_extractor is None and model.has_lora
    # The claim is exact: every loaded tensor is bit-identical to the one saved.
    loaded, saved = model.state_dict(), trained.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.items()) and set(loaded) <= set(saved)
    # The forward is bit-identical too once the weights sit in fresh allocations: the loaders of newer
    # diffusers/transformers releases place tensors at other memory alignments, which changes the CPU
    # kernels' summation order (measured: 4.9e-6 max abs on outputs of scale 1, 0.0 after the copy).
    assert (model(lr, emb) - trained(lr, emb)).abs().max() <= 1e-5 * trained(lr, emb).abs().max()
    for p in model.parameters():
        p.data = p.data.clone()
    assert torch.equal(model(lr, emb), trained(lr, emb))
    # AdcSR's variant of the file: merged weights, only the text encoder comes from the SD directory.
    adcsr = atomic_torch_save(adcsr_osediff_state_dict(trained), tmp_path / "osediff_adcsr.pkl")
    merged = load_osediff_weights(tmp_path / "sd", adcsr, config=config)
    assert not merged.has_lora
    assert (merged(lr, emb) - trained(lr, emb)).abs().max() < 3e-5
    with pytest.raises(AdcError, match="missing"):
        load_osediff_weights(tmp_path / "nowhere", pkl, config=config)


def _one_line_error(fn, *args, match: str):
    with pytest.raises(AdcError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_bad_osediff_files(trained, blank):
    good = osediff_state_dict(trained)
    bad = dict(good)
    del bad["rank_vae"]
    _one_line_error(load_osediff_pkl, blank, bad, match="missing key 'rank_vae'")
    _one_line_error(load_osediff_pkl, blank, {**good, "rank_unet": 8}, match="rank_unet=8")
    key = next(k for k in good["state_dict_unet"] if "lora_A" in k)
    shapes = {**good, "state_dict_unet": {**good["state_dict_unet"], key: torch.zeros(3, 3)}}
    _one_line_error(load_osediff_pkl, blank, shapes, match="shape")
    missing = {**good, "state_dict_vae": dict(list(good["state_dict_vae"].items())[1:])}
    _one_line_error(load_osediff_pkl, blank, missing, match="lacks key")
    lists = {**good, "unet_lora_others_modules": good["unet_lora_others_modules"][1:]}
    _one_line_error(load_osediff_pkl, blank, lists, match="unet_lora_others_modules differs")
    _one_line_error(load_osediff_pkl, blank, {"unet": {}, "vae": {}}, match="AdcSR")
    _one_line_error(load_adcsr_osediff, blank, {"unet": {}}, match="missing key 'vae'")
    assert blank.has_lora  # nothing was half-loaded or merged by a refused file


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(blank, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": _Payload(marker), "state_dict_unet": {}}, path)
    for loader in (load_osediff_pkl, load_adcsr_osediff):
        with pytest.raises(AdcError, match="refused"):
            loader(blank, path)
    with pytest.raises(AdcError, match="refused"):
        load_ram_weights(build_dape("tiny"), path)
    assert not marker.exists()


@torch.no_grad()
def test_x0_matches_ddpm_scheduler(trained, lr, emb):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**SD21_SCHEDULER, clip_sample=False)
    a_bar = sched.alphas_cumprod[999]
    assert abs(a_bar.item() - 0.0046601) < 1e-7
    z = trained.encode(trained.upscale(lr))
    eps = trained.unet(z, torch.tensor([999]), encoder_hidden_states=emb).sample
    expected = (z - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()
    x0 = trained.teacher_latent(lr, emb)
    assert torch.allclose(x0, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # diffusers' own step with the single timestep 999 lands on the same x0 (what OSEDiff relied on).
    sched.set_timesteps(timesteps=[999])
    stepped = sched.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.allclose(one_step_x0(z, eps), stepped, rtol=1e-5, atol=1e-5 * stepped.abs().max().item())


# ---------------------------------------------------------------------------------- DAPE
@torch.no_grad()
def test_dape_tiny_ram_layout_round_trip():
    torch.manual_seed(0)
    a = build_dape("tiny")
    set_lora_b(a, std=0.5, generator=torch.Generator().manual_seed(1))
    a.label_embed.normal_()
    x = torch.randn(2, 3, 64, 64)
    ref = a(x)
    assert ref.shape == (2, a.config.num_classes) and torch.isfinite(ref).all()
    ram, lora = official_state_dicts(a)
    c = a.config.swin_embed_dim
    assert ram["model"]["visual_encoder.layers.0.blocks.0.attn.qkv.weight"].shape == (3 * c, c)
    assert lora["visual_encoder.layers.0.blocks.0.attn.qkv.lora_A"].shape == (2 * a.config.lora_rank, c)
    assert lora["visual_encoder.layers.0.blocks.0.attn.qkv.lora_B"].shape == (2 * c, a.config.lora_rank)
    assert "tagging_head.encoder.layer.0.crossattention.self.query.lora_A" in lora
    assert "tagging_head.encoder.layer.0.attention.self.query.weight" not in ram["model"]  # no self-attention
    torch.manual_seed(7)
    b = build_dape("tiny")
    assert not torch.allclose(b(x), ref)
    assert load_ram_weights(b, ram, lora) == []
    assert torch.equal(b(x), ref)
    # RAM ties the two lowest tag_encoder layers to the tagging head (LoRA stays separate).
    enc = b.tag_encoder.encoder.layer[0].crossattention.self.query
    head = b.tagging_head.encoder.layer[0].crossattention.self.query
    assert enc.base_layer.weight is head.base_layer.weight
    assert enc.lora_A["default"].weight is not head.lora_A["default"].weight
    # Without DAPE.pth: plain RAM (LoRA off).
    c_model = build_dape("tiny")
    load_ram_weights(c_model, ram)
    set_lora_b(a, 0.0)
    assert torch.equal(c_model(x), a(x))
    del ram["model"]["visual_encoder.norm.weight"]
    _one_line_error(load_ram_weights, c_model, ram, match="lack")


@torch.no_grad()
def test_dape_tagging_head_layer_is_ram_cross_attention():
    """A head layer = softmax(q k^T / sqrt(d)) v over image tokens, residual + LN, then BERT's FFN."""
    torch.manual_seed(0)
    m = build_dape("tiny")
    layer = m.tagging_head.encoder.layer[0]
    q_in, img = torch.randn(2, 5, m.config.bert_hidden), torch.randn(2, 7, m.config.joint_dim)
    att = layer.crossattention
    heads = m.config.head_heads
    d = m.config.bert_hidden // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    q, k, v = split(att.self.query(q_in)), split(att.self.key(img)), split(att.self.value(img))
    ctx = (torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v).transpose(1, 2).reshape(2, 5, -1)
    h = att.output.LayerNorm(att.output.dense(ctx) + q_in)
    ffn = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
    assert torch.allclose(layer(q_in, img), ffn, atol=1e-5)


def test_registry_builds_tiny():
    from compress import zoo

    names = zoo.available()
    assert {"osediff", "s3diff", "dape"} <= set(names)


def test_dape_tags_in_bf16_from_fp32_images():
    """``distill.frozen_dtype: bf16`` casts DAPE; the prompt path still hands it fp32 [0, 1] images."""
    torch.manual_seed(0)
    dape = build_dape("tiny").eval()
    tags = [f"tag{i}" for i in range(dape.config.num_classes)]
    image = torch.rand(2, 3, 32, 32)
    want = dape.generate_tags(image, tags)
    got = dape.to(torch.bfloat16).generate_tags(image, tags)
    assert len(got) == 2 and all(isinstance(t, str) for t in got)
    assert want == got or sum(a != b for a, b in zip(want, got)) <= 1  # bf16 may flip a tag at its threshold
