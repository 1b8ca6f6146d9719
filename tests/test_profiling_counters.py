"""Parameter and MAC counters: exact hand-computed values, attention split, cross-checks."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import AdcError
from compress.profile import MacCounter, count_macs, count_macs_fvcore, count_macs_thop, count_params


class ToyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


# Conv2d 3->8 k3 'same' on 16x16: every output pixel of every output channel is 3*3*3 MACs.
TOY_CONV = 16 * 16 * 8 * (3 * 3 * 3)  # 55296
TOY_FC = 8 * 4  # 32


def test_toy_convnet_matches_hand_count_and_leaves_model_untouched():
    model = ToyConvNet()
    r = count_macs(model, torch.randn(1, 3, 16, 16))
    assert r.total == r.conv_linear == TOY_CONV + TOY_FC
    assert r.attention == 0 and r.other == 0
    assert r.by_module["conv"]["conv_linear"] == TOY_CONV
    assert r.by_module["fc"]["conv_linear"] == TOY_FC
    assert r.by_op == {"convolution": TOY_CONV, "addmm": TOY_FC}
    assert r.flops == 2 * r.total
    assert r.counter == "torch.utils.flop_counter.FlopCounterMode"
    assert r.counter_version == torch.__version__
    assert (r.device, r.dtype) == ("meta", "float32")
    assert r.input_shapes == {"args[0]": [1, 3, 16, 16]}
    # the meta run swapped parameters only for the call
    assert all(p.device.type == "cpu" for p in model.parameters())
    # batch scales linearly; CPU run agrees with meta
    r2 = MacCounter(device=None).count(model, torch.randn(2, 3, 16, 16))
    assert r2.total == 2 * r.total and r2.device == "as given"


def test_report_serialises_and_prints():
    r = count_macs(ToyConvNet(), torch.randn(1, 3, 16, 16))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total"] == TOY_CONV + TOY_FC and d["by_module"]["fc"]["total"] == TOY_FC
    text = str(r)
    assert "FlopCounterMode" in text and "conv" in text and "55.296" in text  # K units


# --- attention -----------------------------------------------------------------------------

B, LQ, LK, HEADS, DH, QDIM, KVDIM = 2, 10, 7, 2, 16, 32, 24


def _attention(processor: str):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(QDIM, cross_attention_dim=KVDIM, heads=HEADS, dim_head=DH)
    attn.set_processor(AttnProcessor2_0() if processor == "sdpa" else AttnProcessor())
    return attn


@pytest.mark.parametrize("processor", ["sdpa", "classic"])
def test_attention_split_matches_hand_formula_on_cpu_and_meta(processor):
    """QK^T and AV are B*heads*Lq*Lk*d each; to_q/k/v/out are linear (weight products)."""
    attn = _attention(processor)
    x, ctx = torch.randn(B, LQ, QDIM), torch.randn(B, LK, KVDIM)
    hand_attention = 2 * B * HEADS * LQ * LK * DH
    inner = HEADS * DH
    hand_linear = B * (LQ * QDIM * inner + 2 * LK * KVDIM * inner + LQ * inner * QDIM)
    cpu = MacCounter(device=None).count(attn, x, encoder_hidden_states=ctx)
    meta = MacCounter().count(attn, x, encoder_hidden_states=ctx)
    for r in (cpu, meta):
        assert r.attention == hand_attention
        assert r.conv_linear == hand_linear
        assert r.total == hand_attention + hand_linear
    if processor == "sdpa":
        # CPU runs the fused flash kernel torch's counter scores 0 (pytorch #195460): ours counts it
        assert cpu.by_op.get("_scaled_dot_product_flash_attention_for_cpu") == hand_attention
        assert meta.by_op.get("bmm") == hand_attention


def test_weight_products_are_linear_whatever_the_op():
    """Classification follows data flow: a bmm against a weight is linear, an mm of two
    activations is attention, also under autocast (weights cast to bf16 by copy)."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 8))
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.bmm(x, self.w.expand(x.shape[0], 16, 8))
            h = self.lin(h)
            return h[0] @ h[0].T

    x = torch.randn(2, 5, 16)
    hand_linear, hand_att = 2 * 5 * 16 * 8 + 2 * 5 * 8 * 8, 5 * 5 * 8
    model = Odd()
    for r in (count_macs(model, x), MacCounter(device=None).count(model, x)):
        assert (r.conv_linear, r.attention) == (hand_linear, hand_att)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = MacCounter(device=None).count(model, x)
    assert (r.conv_linear, r.attention) == (hand_linear, hand_att)


# --- roots, names, errors --------------------------------------------------------------------


class Pipe(nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = ToyConvNet()
        self.vae = nn.Module()
        self.vae.decoder = nn.Conv2d(3, 3, 1)
        self.vae.decoder2 = self.vae.decoder  # registered twice: tied under meta swap

    def sr(self, x):
        return self.unet(self.vae.decoder2(x))


def test_function_with_root_names_modules_relative_to_root():
    pipe = Pipe()
    x = torch.randn(1, 3, 16, 16)
    dec = 16 * 16 * 3 * 3
    for r in (
        count_macs(pipe.sr, x),  # bound method: root found automatically
        MacCounter(root=pipe).count(lambda t: pipe.sr(t), x),
    ):
        assert r.total == TOY_CONV + TOY_FC + dec
        assert r.by_module["unet"]["total"] == TOY_CONV + TOY_FC
        assert r.by_module["vae.decoder"]["total"] == dec
        assert r.by_module["unet.conv"]["total"] == TOY_CONV
    r1 = MacCounter(root=pipe, depth=1).count(pipe.sr, x)
    # vae itself is never called: it gets the sum of its called children
    assert set(r1.by_module) == {"unet", "vae"} and r1.by_module["vae"]["total"] == dec


def test_uncalled_containers_sum_their_called_children():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    r = count_macs(Stack(), torch.randn(1, 3, 8, 8))
    b0, b1 = 64 * 3 * 3, 64 * 3 * 27
    assert r.by_module["blocks.0"]["total"] == b0 and r.by_module["blocks.1"]["total"] == b1
    assert r.by_module["blocks"] == {"total": b0 + b1, "conv_linear": b0 + b1, "attention": 0, "other": 0}


def test_meta_failure_is_one_line_adc_error():
    def reads_values(x):
        return x * x.sum().item()

    with pytest.raises(AdcError, match="device=None"):
        count_macs(reads_values, torch.randn(3))
    with pytest.raises(AdcError):
        MacCounter(device="cuda")


# --- cross-check counters --------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.c2(F.relu(self.bn(self.c1(x))))
        return self.fc(self.pool(x).flatten(1))


def test_fvcore_and_thop_agree_on_conv_linear():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 16, 16)
    hand = 2 * (16 * 16 * 8 * 27 + 8 * 8 * 16 * (4 * 9) + 16 * 10)
    primary, fv, th = count_macs(model, x), count_macs_fvcore(model, x), count_macs_thop(model, x)
    assert primary.conv_linear == fv.conv_linear == th.conv_linear == hand
    # they differ on the rest: fvcore/thop also score BN and pooling, the primary counter does not
    assert primary.other == 0 and fv.other > 0 and th.other > 0
    assert fv.counter.startswith("fvcore") and th.counter.startswith("thop")
    assert not any(hasattr(m, "total_ops") for m in model.modules())  # thop cleaned up


# --- parameters ------------------------------------------------------------------------------


def test_count_params_counts_aliases_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)  # 15
            self.b = self.a  # same module registered twice
            self.c = nn.Linear(3, 4)  # 16
            self.d = nn.Linear(3, 4, bias=False)
            self.d.weight = self.c.weight  # tied weight
            self.e = nn.Linear(4, 3, bias=False)
            self.e.weight = nn.Parameter(self.a.weight.data)  # another Parameter, same memory
            self.scale = nn.Parameter(torch.ones(2))  # held by the root itself

    m = Tied()
    n = count_params(m)
    assert n["total"] == 15 + 16 + 2
    assert n["components"] == {"a": 15, "b": 15, "c": 16, "d": 12, "e": 12}
    assert n["unassigned"] == 2
    m.scale.requires_grad_(False)
    g = count_params(m, {"enc": ["a", "c"], "dec": ["d"]})
    assert g["components"] == {"enc": 31, "dec": 12}
    assert g["unassigned"] == 2 and g["trainable"] == 31
    with torch.device("meta"):
        meta = Tied()
    assert count_params(meta)["total"] == 15 + 16 + 12 + 2  # no storage on meta: by identity
    with pytest.raises(AdcError, match="'x'"):
        count_params(m, {"enc": ["x"]})
    with pytest.raises(AdcError):
        count_params(m, {"enc": "a"})


# --- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd21_base_unet_on_meta():
    """SD 2.1-base UNet, 64x64 latent: 865.9 M params, 339.1 G conv+linear, 63.0 G attention."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
        )
    assert count_params(unet)["total"] == 865_910_724
    r = count_macs(unet, torch.randn(1, 4, 64, 64), torch.tensor([999]), encoder_hidden_states=torch.randn(1, 77, 1024))
    assert r.conv_linear == r.by_op["convolution"] + r.by_op["addmm"] + r.by_op["mm"]
    assert round(r.conv_linear / 1e9, 1) == 339.1
    assert round(r.attention / 1e9, 2) == 63.03 and r.attention == r.by_op["bmm"]
    top = [v["total"] for k, v in r.by_module.items() if "." not in k]
    assert sum(top) == r.total  # down_blocks/up_blocks (ModuleLists) included via their children
    assert r.by_module["up_blocks"]["attention"] > r.by_module["down_blocks"]["attention"] > 0
