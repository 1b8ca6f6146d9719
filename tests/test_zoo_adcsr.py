"""The AdcSR student: exact size, official checkpoint layout, official outputs."""

import pickle

import pytest
import torch

from compress.errors import AdcError
from compress.io import atomic_torch_save
from compress.zoo import build
from compress.zoo.adcsr import ADCSR_TINY, build_adcsr, load_official, official_state_dicts
from compress.zoo.construct import count_parameters
from official_adcsr_reference import official_forward


def test_full_size_matches_the_official_parameter_count():
    model = build_adcsr("full", "meta")
    assert count_parameters(model) == 456_073_683  # 456.07 M, as the official Net + half-decoder up path
    parts = {k: count_parameters(v) for k, v in model.components().items()}
    assert round(parts["unet"] / 1e6, 2) == 443.70
    assert round(parts["decoder.mid_block"] / 1e6, 2) == 2.63
    assert round(parts["decoder.up"] / 1e6, 2) == 9.75


def test_full_size_widths_are_the_official_ones():
    unet = build_adcsr("full", "meta").unet
    assert tuple(unet.conv_in.weight.shape) == (240, 12, 3, 3)
    assert tuple(unet.conv_out.weight.shape) == (256, 240, 3, 3)
    assert unet.conv_norm_out.num_groups == 24
    assert unet.down_blocks[1].resnets[1].norm1.num_groups == 32
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 5 and attn.to_q.weight.shape == (240, 240)
    ff = unet.down_blocks[0].attentions[0].transformer_blocks[0].ff
    assert tuple(ff.net[0].proj.weight.shape) == (1920, 240)
    names = [n for n, _ in unet.named_modules()]
    assert not any(n.endswith(("attn2", "time_emb_proj")) or "time_embedding" in n for n in names)


def test_official_layout_has_1076_keys_with_aliases():
    net, dec = official_state_dicts(build_adcsr("full", "meta"))
    assert len(net) == 1076
    assert all(k.startswith("module.body.") for k in net)
    assert "module.body.1.body.0.resnets.0.conv1.weight" in net
    assert "decoder.conv_in.weight" in dec["state_dict"]


def test_tiny_runs_at_any_multiple_of_16():
    model = build("adcsr", "tiny")
    for h, w in [(32, 32), (48, 80)]:
        out = model(torch.rand(1, 3, h, w) * 2 - 1)
        assert out.shape == (1, 3, 4 * h, 4 * w) and torch.isfinite(out).all()


def test_official_checkpoint_round_trip_gives_the_official_outputs(tmp_path):
    torch.manual_seed(0)
    source = build_adcsr("tiny")
    net, dec = official_state_dicts(source)
    atomic_torch_save(net, tmp_path / "net_params_200.pkl")
    atomic_torch_save(dec, tmp_path / "halfDecoder.ckpt")

    torch.manual_seed(1)
    model = build_adcsr("tiny")
    unused = load_official(model, tmp_path / "net_params_200.pkl", tmp_path / "halfDecoder.ckpt")
    assert set(unused["conv_in"]) == {"weight", "bias"}

    lr = torch.rand(2, 3, 32, 48) * 2 - 1
    ours = model(lr)
    reference = official_forward(lr, net, dec, ADCSR_TINY)
    assert torch.equal(ours, source(lr))
    assert (ours - reference).abs().max().item() <= 1e-4


def test_loader_rejects_a_diverging_alias(tmp_path):
    model = build_adcsr("tiny")
    net, dec = official_state_dicts(model)
    key = next(k for k in net if ".body.1.body.0." in k)
    net[key] = net[key] + 1
    with pytest.raises(AdcError, match="differs"):
        load_official(model, net, dec)


def test_loader_names_the_missing_key():
    model = build_adcsr("tiny")
    net, dec = official_state_dicts(model)
    net.pop("module.body.1.conv_in.weight")
    net = {k: v for k, v in net.items() if not k.startswith("module.body.1.body.")}
    with pytest.raises(AdcError, match="conv_in.weight"):
        load_official(model, net, dec)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_needs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "net_params_200.pkl"
    with open(path, "wb") as f:
        pickle.dump({"module.body.1.conv_in.weight": _Evil()}, f)
    with pytest.raises(AdcError, match="refused"):
        load_official(build_adcsr("tiny"), path, None)
    assert "pwned" not in capsys.readouterr().out
