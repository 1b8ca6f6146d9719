"""Stage 1 (decoder pre-training) and stage 2 (adversarial distillation) on tiny models and RealSR images."""

from pathlib import Path

import pytest
import torch

from compress.errors import AdcError
from compress.recover.engine import EngineConfig

from helpers import realsr


def engine(steps, batch=2, **kw):
    return EngineConfig(max_steps=steps, batch_size=batch, checkpoint_every=steps, log_every=1, cpu=True,
                        progress=False, **kw)


def eval_crops(root: Path, sub: str, crop: int, n: int = 4) -> torch.Tensor:
    """Fixed crops (not the training draws) of the last ``n`` images of a folder."""
    from compress.data import HRCropDataset

    ds = HRCropDataset(root / sub, crop=crop, hflip=False, seed=1234)
    return torch.stack([ds[len(ds) - 1 - i] for i in range(n)])


# ---------------------------------------------------------------------------------- stage 1
def test_stage1_lowers_reconstruction_l1_and_exports_a_loadable_half_decoder(tmp_path, one_thread):
    from diffusers.models.autoencoders.vae import Decoder

    from compress.io import load_safetensors, safe_torch_load
    from compress.recover.decoder_pretrain import LatentFeatures, PretrainDecoderConfig, run_stage
    from compress.recover.tiny import tiny_stage1_models
    from compress.zoo.adcsr import ADCSR_TINY, build_adcsr, build_half_decoder, load_official, official_state_dicts

    root = realsr()
    models = tiny_stage1_models(0)
    hr = eval_crops(root, "HR", 64) * 2 - 1
    latents = LatentFeatures(models.vae)

    def l1() -> float:
        with torch.no_grad():
            return (models.decoder(latents(hr)) - hr).abs().mean().item()

    before = l1()
    cfg = PretrainDecoderConfig(train_hr=[root / "HR"], crop=64, lr=2e-3, betas=(0.9, 0.999), lpips_weight=1.0,
                                disc_start=12, keep_best=False, engine=engine(14))  # the last step: what training did
    notes = []
    art = run_stage(models, cfg, tmp_path, log=notes.append)
    after = l1()
    assert after < 0.9 * before, (before, after)  # measured 0.536 -> 0.463 (16-channel latent)
    val = art["val_psnr_y"]  # still measured without keep_best (whether it rises depends on the data folder)
    assert val["start_step"] == 0 and val["last_step"] == 14 and val["keep_best"] is False
    assert any("LPIPS" in n for n in notes)  # used, or skipped with a notice (never downloaded)
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("step,l1,") and "d_loss" in csv[0] and len(csv) == 16  # + the step-0 validation
    assert csv[-1].split(",")[csv[0].split(",").index("d_loss")] != ""  # D trained from disc_start on

    # halfDecoder.ckpt: the official layout, read by load_official (mid-block + up path) ...
    ckpt = safe_torch_load(art["half_decoder"])
    assert set(ckpt) == {"state_dict"} and all(k.startswith("decoder.") for k in ckpt["state_dict"])
    student = build_adcsr("tiny")
    net, _ = official_state_dicts(build_adcsr("tiny"))
    net = {k: v for k, v in net.items() if not k.startswith("module.body.2.")}  # mid-block from halfDecoder
    unused = load_official(student, net_params=net, half_decoder=art["half_decoder"])
    trained = models.decoder.state_dict()
    assert torch.equal(student.mid_block.attentions[0].to_q.weight, trained["mid_block.attentions.0.to_q.weight"])
    assert torch.equal(student.up.conv_out.weight, trained["conv_out.weight"])
    assert torch.equal(unused["conv_in"]["weight"], trained["conv_in.weight"])
    # ... and, prefix stripped, strictly by a diffusers Decoder, as the official train.py does
    fresh = build_half_decoder(ADCSR_TINY)
    assert isinstance(fresh, Decoder)
    fresh.load_state_dict({k[len("decoder."):]: v for k, v in ckpt["state_dict"].items()}, strict=True)
    fresh.load_state_dict(load_safetensors(art["decoder"]), strict=True)  # diffusers naming
    with torch.no_grad():
        assert torch.equal(fresh(latents(hr[:1])), models.decoder(latents(hr[:1])))


def _stage1_keep_best(tmp_path, lr: float):
    """3-4 steps of stage 1 on the tiny decoder, validated after every step on 2 training crops."""
    from compress.recover.decoder_pretrain import PretrainDecoderConfig, run_stage
    from compress.recover.tiny import tiny_stage1_models

    models = tiny_stage1_models(0)
    start = {k: v.clone() for k, v in models.decoder.state_dict().items()}
    cfg = PretrainDecoderConfig(train_hr=[TRAIN_HR], crop=32, lr=lr, betas=(0.9, 0.999), lpips_weight=0.0,
                                adv_weight=0.0, val_every=1, val_images=2, engine=engine(4))
    art = run_stage(models, cfg, tmp_path, log=lambda s: None)
    return models, start, art


TRAIN_HR = Path(__file__).resolve().parents[1] / "data" / "samples" / "train"


def test_stage1_that_only_hurts_returns_the_decoder_it_was_given(tmp_path, one_thread):
    """keep_best: lr 1.0 wrecks the decoder at the first step (13.2 -> 6.9 dB measured); the stage
    returns (and exports) the initial weights, bit for bit, and says the best step was 0."""
    from compress.io import load_safetensors

    models, start, art = _stage1_keep_best(tmp_path, lr=1.0)
    v = art["val_psnr_y"]
    assert art["best_step"] == 0 and v["best"] == v["start"] > v["last"] + 1.0 and v["restored"], v
    for name, weights in (("returned", models.decoder.state_dict()), ("exported", load_safetensors(art["decoder"]))):
        assert weights.keys() == start.keys() and all(torch.equal(weights[k], start[k]) for k in start), name
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",val_psnr_y") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]


def test_stage1_that_helps_keeps_a_later_step(tmp_path, one_thread):
    from compress.recover.decoder_pretrain import LatentFeatures, reconstruction_psnr, validation_images

    models, start, art = _stage1_keep_best(tmp_path, lr=2e-3)
    v = art["val_psnr_y"]
    assert art["best_step"] > 0 and v["best"] > v["start"] + 0.3, v  # measured 13.23 -> 14.06 dB at step 3
    # the returned decoder is the one that scored best (the validation set: 2 centre crops of training files)
    val = validation_images([TRAIN_HR], 32, 2)
    assert val.shape == (2, 3, 32, 32)
    assert abs(reconstruction_psnr(LatentFeatures(models.vae), models.decoder, val) - v["best"]) < 1e-3


def test_stage1_scratch_init_redraws_the_weights():
    from compress.recover.decoder_pretrain import reinitialise
    from compress.recover.tiny import tiny_stage1_models

    dec = tiny_stage1_models(0).decoder
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    reinitialise(dec, seed=5)
    changed = [k for k, v in dec.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert "conv_in.weight" in changed and "mid_block.attentions.0.to_q.weight" in changed


# ---------------------------------------------------------------------------------- stage 2
def test_discriminator_trains_only_lora_and_conv_in():
    from compress.recover.distill import make_unet_discriminator
    from compress.zoo.sd import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny")
    d = make_unet_discriminator(unet, in_channels=16, rank=4)
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("unet.conv_in.") for n in trainable)
    assert any(n.startswith("unet.conv_in.base_layer.") for n in trainable)  # the new conv_in itself
    assert {n.split("lora_A.")[1].split(".")[0] for n in trainable if "lora_A." in n} == \
        {"default_encoder", "default_decoder", "default_others"}
    ranks = {p.shape[0] for n, p in d.named_parameters() if "lora_A." in n}
    assert ranks == {4}
    # conv_in: 16 -> 32, the old 4-input weight repeated 4x and divided by 4; the source UNet is untouched
    w = d.unet.conv_in.base_layer.weight
    assert w.shape == (32, 16, 3, 3) and unet.conv_in.weight.shape == (32, 4, 3, 3)
    assert torch.allclose(w[:, 4:8], unet.conv_in.weight / 4) and torch.equal(w[:, :4], w[:, 12:])
    out = d(torch.randn(2, 16, 8, 8), torch.randn(2, 77, 32))
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(AdcError, match="not a multiple"):
        make_unet_discriminator(unet, in_channels=18)


def test_stage2_lowers_student_teacher_feature_l1(tmp_path, one_thread):
    from compress.io import load_safetensors, safe_torch_load
    from compress.recover.distill import DistillConfig, run_stage
    from compress.recover.tiny import tiny_stage2_bundle, tiny_stage2_parts
    from compress.zoo.adcsr import build_adcsr, load_official

    root = realsr()
    parts = tiny_stage2_parts(0)
    cfg = DistillConfig(train_hr=[root / "HR"], crop=64, lr_g=2e-3, adv_start=6, prompt="empty", engine=engine(8))
    bundle = tiny_stage2_bundle(cfg, 0, parts)
    d_before = {n: p.detach().clone() for n, p in bundle.discriminator.named_parameters()}
    lr = eval_crops(root, "LR", 16) * 2 - 1  # real RealSR LR crops (training sees synthetic LR only)

    def feat_l1() -> float:
        with torch.no_grad():
            return (bundle.student(lr) - bundle.teacher(lr)).abs().mean().item()

    before = feat_l1()
    art = run_stage(bundle, cfg, tmp_path, log=lambda s: None)
    after = feat_l1()
    assert after < 0.9 * before, (before, after)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "feat_l1", "adv_g", "d_real", "d_fake"]
    # D moved only in its LoRA and conv_in (from adv_start on); the frozen UNet body did not
    moved = {n for n, p in bundle.discriminator.named_parameters() if not torch.equal(p, d_before[n])}
    assert moved and all("lora_" in n or n.startswith("unet.conv_in.") for n in moved)
    # exports: our naming, and the official layout, which load_official reads back
    student = build_adcsr("tiny")
    student.load_state_dict(load_safetensors(art["adcsr"]), strict=True)
    again = build_adcsr("tiny")
    load_official(again, net_params=art["net_params"], half_decoder=art["half_decoder"])
    with torch.no_grad():
        assert torch.equal(student.features(lr), again.features(lr))
        assert torch.allclose(student.features(lr), bundle.student(lr))
    assert set(safe_torch_load(art["half_decoder"])["state_dict"]) >= {"decoder.conv_in.weight"}


def test_adcsr_bundle_checks_the_crop():
    from compress.recover.distill import DistillConfig
    from compress.recover.tiny import tiny_stage2_bundle

    with pytest.raises(AdcError, match="distill.crop: 80"):
        tiny_stage2_bundle(DistillConfig(crop=80), 0)


def test_gradient_checkpointing_gives_the_same_gradients():
    from compress.recover.engine import enable_gradient_checkpointing
    from compress.zoo.adcsr import build_adcsr

    torch.manual_seed(0)
    a = build_adcsr("tiny").train()
    b = build_adcsr("tiny").train()
    b.load_state_dict(a.state_dict())
    assert enable_gradient_checkpointing(b) > 5  # the diffusers blocks inside the condition-free UNet + mid-block
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    a.features(lr).square().mean().backward()
    b.features(lr).square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.slow  # two short stage-2 runs: about 13 s
def test_stage2_with_gradient_checkpointing_trains_exactly_like_without(tmp_path, one_thread):
    """The memory lever changes nothing but memory: student and discriminator (LoRA, frozen during the
    generator's step) checkpointed, the adversarial term on from step 0, float64, same weights."""
    from safetensors.torch import load_file

    from compress.recover.tiny import main

    common = ["stage2", "--steps", "2", "--batch", "2", "--crop", "64", "--every", "2", "--float64",
              "--adv-weight", "0.1"]
    assert main([*common, "--run-dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--run-dir", str(tmp_path / "ckpt"), "--checkpointing"]) == 0
    for name in ("student.safetensors", "discriminator_trainable.safetensors"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "ckpt" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-9), (name, k)
