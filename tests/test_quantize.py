"""Post-training int8 quantization (onnxruntime QDQ) of the tiny AdcSR student, and the ship gate.

Tiny widths, random weights, LR 16, CPU, one thread. Random weights are harder to quantize than a
trained student (no training pulled activations into shape): the bounds here are ones a broken
quantization (wrong ranges, a lost scale) would fail by far, not the issue's 35 dB goal, which is
measured on trained students in reports/quantization.md.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

for _mod in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_mod)

from compress.config import from_dict  # noqa: E402
from compress.deploy import export_model, load_exported, read_export_record  # noqa: E402
from compress.errors import AdcError  # noqa: E402
from compress.quantize import QuantizeConfig, calibration_set, quantize_onnx, ship  # noqa: E402
from compress.zoo.adcsr import build_adcsr  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "data" / "samples" / "train"
LR = 16
FAST = dict(calibration_images=4, check_images=2, sensitivity=False, warmup=0, repeats=1)


def _onnx_nodes(path):
    import onnx

    return onnx.load(str(path)).graph.node


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory, one_thread_module):
    torch.manual_seed(0)
    model = build_adcsr("tiny").eval()
    path = tmp_path_factory.mktemp("q") / "tiny.onnx"
    export_model(model, path, "onnx", LR, color_fix="inside", source="tests: tiny seed 0")
    return path


@pytest.fixture(scope="module")
def cal():
    return calibration_set([TRAIN], LR, 4, 4, 2, seed=0)


@pytest.fixture(scope="module")
def all_int8(tiny_fp32, cal):
    config = QuantizeConfig(**FAST)
    return quantize_onnx(tiny_fp32, tiny_fp32.with_name("all.int8.onnx"), config, cal.calibration,
                         calibration_how=cal.how)


def test_calibration_holds_out_files_and_is_seeded(cal):
    assert len(cal.calibration) == 4 and len(cal.held_out) == 2
    assert not set(cal.calibration_files) & set(cal.held_out_files)
    assert all(x.shape == (1, 3, LR, LR) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
               for x in cal.calibration + cal.held_out)
    again = calibration_set([TRAIN], LR, 4, 4, 2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(cal.calibration, again.calibration))


def test_int8_file_is_smaller_close_to_fp32_and_records_how(tiny_fp32, all_int8, cal):
    q = all_int8.quantization
    assert all_int8.path.stat().st_size < 0.5 * tiny_fp32.stat().st_size  # int8 weights (graph overhead aside)
    assert q["quantized_nodes"] == q["quantizable_nodes"] > 200 and q["activation_matmuls_fp32"] > 0
    ops = {n.op_type for n in _onnx_nodes(all_int8.path)}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    rec = read_export_record(all_int8.path)  # what OnnxSR needs is still there
    assert rec["lr_size"] == [LR, LR] and rec["scale"] == 4 and rec["color_fix"] == "inside"
    assert rec["precision"].startswith("int8") and rec["quantization"]["method"] == "minmax"
    # held-out crops, not the calibration ones; a lost scale or a wrong range gives single digits
    fp32, int8 = load_exported(tiny_fp32), load_exported(all_int8.path)
    x = torch.from_numpy(cal.held_out[0])
    a, b = fp32(x).clamp(-1, 1), int8(x).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (a - b).square().mean()).item()
    assert psnr > 20, psnr


def test_sensitivity_keeps_the_most_sensitive_groups_fp32(tiny_fp32, all_int8, cal, tmp_path):
    # the UNet fp32 by keep_fp32 (a smaller search); the bound just above what all-int8 reaches forces the search
    base = QuantizeConfig(**{**FAST, "keep_fp32": ["/model/unet/*"]})
    plain = quantize_onnx(tiny_fp32, tmp_path / "plain.onnx", base, cal.calibration)
    reached = plain.quantization["calibration_score"]["psnr_db"]
    config = QuantizeConfig(**{**FAST, "keep_fp32": ["/model/unet/*"], "sensitivity": True, "group_depth": 3,
                               "min_psnr_vs_fp32": reached + 0.5, "max_fp32_fraction": 1.0})
    mixed = quantize_onnx(tiny_fp32, tmp_path / "mixed.onnx", config, cal.calibration)
    q = mixed.quantization
    kept = q["kept_fp32"]["sensitivity"]
    assert kept and q["calibration_score"]["psnr_db"] > reached
    assert q["quantized_nodes"] == plain.quantization["quantized_nodes"] - len(kept)
    rows = mixed.sensitivity
    assert rows and all(r["group"].startswith(("/model/up", "/model/mid_block")) for r in rows)
    assert [r["psnr_db"] for r in rows] == sorted(r["psnr_db"] for r in rows)  # most sensitive first
    assert rows[0]["kept_fp32"]  # kept in order of sensitivity

    def weight_dq(path):  # nodes whose weight comes through a DequantizeLinear
        nodes = _onnx_nodes(path)
        dq_out = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
                and n.input[1] in dq_out}

    assert set(kept) <= weight_dq(plain.path) and not set(kept) & weight_dq(mixed.path)
    assert not any(n.startswith("/model/unet/") for n in weight_dq(mixed.path))
    with pytest.raises(AdcError, match="keep_fp32: '/nope/\\*' matches no quantizable node"):
        quantize_onnx(tiny_fp32, tmp_path / "x.onnx", QuantizeConfig(**{**FAST, "keep_fp32": ["/nope/*"]}),
                      cal.calibration)


def test_gate_ships_fp32_when_the_bound_is_impossible_and_says_so(tiny_fp32, all_int8, cal, tmp_path):
    config = QuantizeConfig(**{**FAST, "min_psnr_vs_fp32": 200.0})
    res = ship(tiny_fp32, all_int8, config, cal.held_out, tmp_path / "s.int8.onnx", tmp_path / "s.fp32.onnx")
    assert res.shipped == "fp32" and res.path == tmp_path / "s.fp32.onnx"
    assert not (tmp_path / "s.int8.onnx").exists()
    assert any("below min_psnr_vs_fp32 200 dB" in r for r in res.reasons)
    rec = read_export_record(res.path)
    assert rec["precision"] == "fp32" and rec["quantization"]["shipped"] == "fp32"
    assert rec["quantization"]["verdict"].startswith("fp32 shipped: ")
    assert {"fp32", "int8"} == set(rec["quantization"]["check"]["latency_ms"])


def test_int8_ships_when_it_passes_and_compress_sr_runs_it(tiny_fp32, all_int8, cal, tmp_path):
    from compress.sr import main as sr_main

    config = QuantizeConfig(**{**FAST, "min_psnr_vs_fp32": 10.0, "speed_gate": False})
    res = ship(tiny_fp32, all_int8, config, cal.held_out, tmp_path / "s.int8.onnx", tmp_path / "s.fp32.onnx")
    assert res.shipped == "int8" and res.path.is_file() and not (tmp_path / "s.fp32.onnx").exists()
    assert "speed gate off" in res.record["quantization"]["verdict"]
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lr / "a.png")
    assert sr_main(["--model", str(res.path), "--input", str(lr), "--output", str(tmp_path / "sr"),
                    "--tile", str(LR)]) == 0
    assert Image.open(tmp_path / "sr" / "a.png").size == (96, 80)


def test_quantize_stage_ships_one_file_with_a_report(tiny_fp32, tmp_path, monkeypatch):
    from compress.stages.quantize import run_quantize

    torch.manual_seed(0)
    student = build_adcsr("tiny").eval()
    notes = []
    bundle = SimpleNamespace(
        recipe=SimpleNamespace(name="t", task=SimpleNamespace(lr_size=LR, scale=4),
                               data=SimpleNamespace(train_hr=[TRAIN])),
        student_state=lambda: SimpleNamespace(model=student, on_meta=False), student_dir=lambda: tmp_path / "student",
        rel=lambda p: str(Path(p).relative_to(tmp_path)), note=notes.append)
    config = from_dict(QuantizeConfig, {**FAST, "keep_fp32": ["/model/unet/*"], "sensitivity": True,
                                        "group_depth": 2, "min_speedup": 50.0, "preprocess": True,
                                        "method": "percentile"}, "stages.quantize")
    art = run_quantize(bundle, config, tmp_path / "05-quantize")
    assert art["shipped"] == "fp32" and "below min_speedup 50x" in art["verdict"] and notes
    assert art["nodes"]["kept_fp32_by_config"] > 150  # the UNet's, named as after quant_pre_process
    assert sorted(p.name for p in (tmp_path / "05-quantize").iterdir()) == \
        ["quantize.md", "sensitivity.csv", "student.fp32.onnx"]
    md = (tmp_path / "05-quantize" / "quantize.md").read_text()
    assert "fp32 shipped" in md and "onnxruntime" in md and "LR 16x16" in md and "/tmp" not in md
    assert json.loads(json.dumps(art))  # JSON-able artifacts


def test_config_ranges_are_one_line_naming_the_key():
    with pytest.raises(AdcError, match=r"^q\.min_psnr_vs_fp32: .*outside"):
        from_dict(QuantizeConfig, {"min_psnr_vs_fp32": 500}, "q")
    with pytest.raises(AdcError, match=r"^q\.lr_size: 40 is not a multiple of 16"):
        from_dict(QuantizeConfig, {"lr_size": 40}, "q")
    with pytest.raises(AdcError, match=r"^q\.method"):
        from_dict(QuantizeConfig, {"method": "kl"}, "q")


def test_a_bad_calibration_folder_is_one_error_line(tmp_path):
    with pytest.raises(AdcError, match="image folder not found"):
        calibration_set([tmp_path / "missing"], LR, 4, 2, 1)
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "compress.export", "adcsr", "--size", "tiny", "--quantize", "int8",
                        "--calibration", str(tmp_path / "empty"), "--out", str(tmp_path / "t.onnx")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --calibration ") and "holds no images" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "t.onnx").exists()
