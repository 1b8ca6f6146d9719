"""Stage-2 options beside AdcSR's objective: output-level distillation, a trainable up path, the
closed-form (least-squares) start of the student's new conv_in, and block-wise feature distillation.
Tiny random models, one thread."""

import copy

import pytest
import torch
from torch import nn

from compress.errors import AdcError
from compress.recover.engine import EngineConfig

from helpers import realsr


def engine(steps):
    return EngineConfig(max_steps=steps, batch_size=2, checkpoint_every=steps, log_every=1, cpu=True, progress=False)


@pytest.fixture(scope="module")
def tiny_parts():
    from compress.recover.tiny import tiny_stage2_parts

    return tiny_stage2_parts(0)  # built once (seconds); each test takes a copy


def bundle_for(parts, **kw):
    from compress.recover.distill import DistillConfig
    from compress.recover.tiny import tiny_stage2_bundle

    cfg = DistillConfig(train_hr=[realsr() / "HR"], crop=64, prompt="empty", engine=engine(1), **kw)
    return tiny_stage2_bundle(cfg, 0, copy.deepcopy(parts)), cfg


def trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_options_off_keep_adcsrs_setup(tiny_parts, one_thread):
    from compress.recover.distill import AdcSRStudentFeatures, TeacherFeatures, build_setup

    b, cfg = bundle_for(tiny_parts, adv_weight=0.1)
    assert type(b.student) is AdcSRStudentFeatures and type(b.teacher) is TeacherFeatures
    assert [(p.student, p.teacher, p.name, p.weight) for p in b.pairs] == [("adcsr.mid_block", "decoder.mid_block",
                                                                           "feat_l1", 1.0)]
    assert b.adv_on == ""
    setup = build_setup(b, cfg, dataset=[])
    assert setup.losses == {"student": ["feat_l1", "adv_g"], "discriminator": ["d_real", "d_fake"]}
    names = trainable(b.student)
    assert names and all(n.startswith(("adcsr.unet.", "adcsr.mid_block.")) for n in names)
    assert not any(n.startswith("adcsr.up.") for n in names)
    opt = {id(p) for g in setup.optimizers["student"].param_groups for p in g["params"]}
    assert opt == {id(p) for p in b.student.parameters() if p.requires_grad}


def output_step(b) -> dict[str, bool]:
    """One output-term backward; for each up-path parameter, whether it got a (non-zero) gradient."""
    from compress.recover.distill import capture

    lr = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # the output pair compares images: student SR and the teacher's full-decoder SR
        t = b.teacher(lr)
    with capture(b.student, ["adcsr.mid_block"]) as cap:
        s = b.student(lr)
    assert s.shape == t.shape == (2, 3, 64, 64) and cap["adcsr.mid_block"].shape[1] == 32
    (s - t).abs().mean().backward()
    assert b.student.adcsr.unet.conv_in.weight.grad is not None
    up = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in b.student.adcsr.up.named_parameters()}
    b.student.zero_grad(set_to_none=True)
    return up


def test_output_term_without_train_up_leaves_the_up_path_frozen(tiny_parts, one_thread):
    from compress.recover.distill import build_setup, capture

    b, cfg = bundle_for(tiny_parts, adv_weight=0, output_weight=1.0, unet_out_weight=0.5)
    assert build_setup(b, cfg, dataset=[]).losses == {"student": ["feat_l1", "out_l1", "unet_l1"]}
    unet_pair = b.pairs[-1]  # the "latent" variant: student UNet output vs the teacher's decoder conv_in output
    assert (unet_pair.student, unet_pair.teacher, unet_pair.weight) == ("adcsr.unet", "decoder.conv_in", 0.5)
    assert not any(n.startswith("adcsr.up.") for n in trainable(b.student))
    assert not any(output_step(b).values())
    # the default compares the outputs after the colour fix: blind to a per-channel offset of the up path
    lr, bias = torch.rand(2, 3, 16, 16) * 2 - 1, b.student.adcsr.up.conv_out.bias
    with torch.no_grad():
        s0 = b.student(lr)
        bias.add_(0.3)
        s1 = b.student(lr)
        bias.sub_(0.3)
    assert torch.allclose(s0, s1, atol=1e-4)
    with torch.no_grad(), capture(b.student, ["adcsr.unet"]) as s_cap, capture(b.teacher, ["decoder.conv_in"]) as t_cap:
        b.student(lr), b.teacher(lr)
    assert s_cap["adcsr.unet"].shape == t_cap["decoder.conv_in"].shape == (2, 32, 8, 8)


def test_output_distillation_with_train_up_trains_the_up_path(tiny_parts, tmp_path, one_thread):
    from compress.recover.distill import run_stage

    b, cfg = bundle_for(tiny_parts, adv_weight=0, output_weight=1.0, train_up=True)
    # (after the colour fix, conv_out's bias is invisible to the loss: the fix removes per-channel offsets)
    grads = output_step(b)
    assert all(g for n, g in grads.items() if n.startswith("up_blocks.")) and grads["conv_out.weight"]
    up = {n: p.detach().clone() for n, p in b.student.adcsr.up.named_parameters()}
    run_stage(b, cfg, tmp_path, log=lambda s: None, write_student=False)
    moved = {n: not torch.equal(p, up[n]) for n, p in b.student.adcsr.up.named_parameters()}
    assert all(m for n, m in moved.items() if n.startswith("up_blocks."))
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")[:3] == ["step", "feat_l1", "out_l1"]


def test_option_checks():
    from compress.recover.distill import DistillConfig

    with pytest.raises(AdcError, match="train_up"):
        DistillConfig(train_up=True).validate("distill")
    with pytest.raises(AdcError, match="output_weight: expected >= 0"):
        DistillConfig(output_weight=-1).validate("distill")
    with pytest.raises(AdcError, match="init_crops"):
        DistillConfig(init_crops=0).validate("distill")


def test_lstsq_reproduces_a_linear_map_exactly():
    from compress.recover.init import fit_conv

    torch.manual_seed(0)
    true = nn.Conv2d(12, 5, 3, padding=1).double()
    conv = nn.Conv2d(12, 5, 3, padding=1)
    xs = [torch.randn(4, 12, 8, 8, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        res = fit_conv(conv, [(x, true(x)) for x in xs], ridge=0.0)
    assert res["residual_before"] > 0.5 and res["residual_after"] < 1e-6
    assert torch.allclose(conv.weight.double(), true.weight, atol=1e-5)
    assert torch.allclose(conv.bias.double(), true.bias, atol=1e-5)


def test_kept_channels_are_matched_or_leading():
    from compress.recover.init import kept_channels, match_channels

    t = torch.randn(8, 2)
    assert match_channels(t[[1, 4, 6]], t) == [1, 4, 6]
    assert match_channels(t[[4, 1]], t) is None  # pruning keeps the order
    idx, how = kept_channels(3, 8, torch.ones(3, 2), torch.ones(8, 2))  # an untrained GroupNorm: no unique match
    assert idx == [0, 1, 2] and "assumed" in how
    assert kept_channels(3, 8, t[[1, 4, 6]], t)[0] == [1, 4, 6]


def test_lstsq_init_lowers_the_conv_in_residual_on_calibration_crops(tiny_parts, one_thread):
    from compress.data import DegradationConfig, RealESRGANDegradation
    from compress.families import get
    from compress.recover.init import calibration_lr, fit_student_conv_in, layer_output
    p = copy.deepcopy(tiny_parts)
    student, teacher = p["student"], p["teacher"]
    parts = get(p["family"]).distill_parts(teacher, "tiny", None)
    degrade = RealESRGANDegradation(DegradationConfig.from_dict({"gt_size": 64}))
    lrs = list(calibration_lr([realsr() / "HR"], 64, degrade, 6, seed=5, batch=4))
    assert [x.shape[0] for x in lrs] == [4, 2] and lrs[0].shape[-1] == 16
    latent = lambda lr: parts.teacher_latent(lr, None)  # noqa: E731
    fit = fit_student_conv_in(student, latent, teacher.unet, lrs)
    assert fit.crops == 6 and fit.residual_after < fit.residual_before
    # the residual from the normal equations' statistics is the one measured directly
    conv = student.unet.conv_in
    with torch.no_grad():
        y = torch.cat([layer_output(lambda: latent(lr), teacher.unet.conv_in)[:, :conv.out_channels] for lr in lrs])
        pred = torch.cat([conv(student.unshuffle(lr)) for lr in lrs])
    direct = (pred - y).norm() / (y - y.mean((0, 2, 3), keepdim=True)).norm()
    assert abs(float(direct) - fit.residual_after) < 1e-3 * fit.residual_after + 1e-6


# --------------------------------------------------------------------------------------------
# Block-wise feature distillation (block_weight)
# --------------------------------------------------------------------------------------------
BLOCKS = ["blk_down0", "blk_down1", "blk_down2", "blk_down3", "blk_mid", "blk_up0", "blk_up1", "blk_up2", "blk_up3"]


def block_engine(steps):
    return EngineConfig(max_steps=steps, batch_size=2, checkpoint_every=1, log_every=1, cpu=True, progress=False)


def test_block_option_adds_one_normalised_term_per_unet_block(tiny_parts, one_thread):
    from compress.recover.distill import build_setup

    b, cfg = bundle_for(tiny_parts, adv_weight=0.1, block_weight=2.0)
    blk = b.pairs[1:]
    assert [p.name for p in blk] == BLOCKS and all(p.loss == "l1_rel" and p.weight == 2.0 / 9 for p in blk)
    assert (blk[0].student, blk[0].teacher) == ("adcsr.unet.down_blocks.0", "teacher.unet.down_blocks.0")
    setup = build_setup(b, cfg, dataset=[])
    assert setup.losses == {"student": ["feat_l1", *BLOCKS, "adv_g"], "discriminator": ["d_real", "d_fake"]}
    # the tiny student is 0.75x the teacher in every block: one projector each, trained by the student's optimiser
    assert set(b.projectors.convs) == set(BLOCKS) and setup.trainable["projector"] is b.projectors
    group = setup.optimizers["student"].param_groups[1]["params"]
    assert {id(p) for p in b.projectors.parameters()} == {id(p) for p in group}
    b2, _ = bundle_for(tiny_parts, adv_weight=0.1, block_weight=1.0, block_layers=["mid_block", "up_blocks.3"])
    assert [p.name for p in b2.pairs[1:]] == ["blk_mid", "blk_up3"] and b2.pairs[1].weight == 0.5


def test_projectors_only_where_the_student_is_narrower(tiny_parts, one_thread):
    from dataclasses import replace

    from compress.families import get
    from compress.recover.distill import BlockProjectors, DistillConfig, block_pairs
    from compress.zoo.adcsr import ADCSR_TINY, build_adcsr

    torch.manual_seed(0)  # the teacher's first block is 32 wide: so are this student's down_blocks.0 and up_blocks.3
    student = build_adcsr(config=replace(ADCSR_TINY, unet_block_out_channels=(32, 48, 48, 48)))
    parts = get(tiny_parts["family"]).distill_parts(tiny_parts["teacher"], "tiny", None)
    pairs, widths = block_pairs(student, parts, DistillConfig(block_weight=1.0))
    assert widths["blk_down0"] == widths["blk_up3"] == (32, 32) and widths["blk_mid"] == (48, 64)
    proj = BlockProjectors(widths)
    assert set(proj.convs) == set(BLOCKS) - {"blk_down0", "blk_up3"}
    x = {"blk_down0": torch.randn(1, 32, 4, 4), "blk_mid": torch.randn(1, 48, 1, 1)}
    y = proj(x)
    assert y["blk_down0"] is x["blk_down0"] and y["blk_mid"].shape == (1, 64, 1, 1)
    # the least-squares start recovers a linear map from one batch
    true = nn.Conv2d(48, 64, 1).double()
    s = torch.randn(4, 48, 4, 4, dtype=torch.float64)
    fit = BlockProjectors({"a": (48, 64)}, dtype=torch.float64).fit({"a": s}, {"a": true(s).detach()}, ridge=0.0)
    assert fit["a"][0] > 0.5 and fit["a"][1] < 1e-6


def block_run(parts, run_dir, steps, **kw):
    from compress.recover.distill import DistillConfig, run_stage
    from compress.recover.tiny import tiny_stage2_bundle

    cfg = DistillConfig(train_hr=[realsr() / "HR"], crop=64, prompt="empty", adv_weight=0, engine=block_engine(steps),
                        **kw)
    b = tiny_stage2_bundle(cfg, 0, copy.deepcopy(parts))
    return b, run_stage(b, cfg, run_dir, log=lambda s: None)


def test_block_run_resumes_exactly_and_keeps_the_projector_out_of_the_student(tiny_parts, tmp_path, one_thread):
    import csv

    from safetensors.torch import load_file

    from compress.recover.engine import latest_checkpoint

    straight, out = block_run(tiny_parts, tmp_path / "straight", 2, block_weight=1.0)
    rows = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(rows[0][n]) > 0 for n in BLOCKS)
    student = load_file(str(tmp_path / "straight" / "student.safetensors"))
    assert student and all(k.startswith("adcsr.") for k in student) and not any("convs." in k for k in student)
    assert out["model"] is straight.student and "projector" not in out
    ckpt = latest_checkpoint(tmp_path / "straight")  # the projector lives in the checkpoints (for resume) only
    saved = load_file(str(ckpt / "model_1.safetensors"))
    assert set(saved) == set(straight.projectors.state_dict())

    block_run(tiny_parts, tmp_path / "resumed", 1, block_weight=1.0)  # stopped after step 1 ...
    resumed, _ = block_run(tiny_parts, tmp_path / "resumed", 2, block_weight=1.0)  # ... and resumed to 2
    for a, b in ((straight.student, resumed.student), (straight.projectors, resumed.projectors)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    def losses(run):  # each step's terms and lr (steps/s aside)
        return [r.split(",")[:-1] for r in (tmp_path / run / "metrics.csv").read_text().splitlines()]

    assert losses("resumed") == losses("straight")


def test_block_option_leaves_adcsrs_term_alone(tiny_parts, tmp_path, one_thread):
    """Same data, degradation and initial weights with or without it: AdcSR's term at step 1 is equal."""
    import csv

    block_run(tiny_parts, tmp_path / "on", 1, block_weight=1.0, block_layers=["mid_block"])
    block_run(tiny_parts, tmp_path / "off", 1)
    on, off = (next(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("on", "off"))
    assert off["feat_l1"] == on["feat_l1"] and "blk_mid" in on and "blk_mid" not in off


def test_block_weight_zero_is_adcsrs_setup(tiny_parts, one_thread):
    from compress.recover.distill import build_setup

    b0, cfg0 = bundle_for(tiny_parts, adv_weight=0.1)
    b1, cfg1 = bundle_for(tiny_parts, adv_weight=0.1, block_weight=0.0)
    assert b0.projectors is None and b1.projectors is None
    assert [(p.student, p.teacher, p.name, p.weight) for p in b0.pairs] == \
        [(p.student, p.teacher, p.name, p.weight) for p in b1.pairs]
    s0, s1 = build_setup(b0, cfg0, dataset=[]), build_setup(b1, cfg1, dataset=[])
    assert s0.losses == s1.losses and set(s1.trainable) == {"student", "discriminator"}
    assert len(s1.optimizers["student"].param_groups) == 1


def test_block_option_checks(tiny_parts):
    from compress.recover.distill import DistillConfig

    with pytest.raises(AdcError, match="block_layers: used only by block-wise"):
        DistillConfig(block_layers=["mid_block"]).validate("distill")
    with pytest.raises(AdcError, match="block_weight: expected >= 0"):
        DistillConfig(block_weight=-1).validate("distill")
    with pytest.raises(AdcError, match=r"block_layers: no block 'up_blocks.9' in the student UNet"):
        bundle_for(tiny_parts, adv_weight=0, block_weight=1.0, block_layers=["up_blocks.9"])
