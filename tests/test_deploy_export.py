"""Export (ONNX, torch.export) of the AdcSR student: parity with eager, the record, and the runtimes.

Tiny widths, fp32, CPU. The ONNX tests need onnx, onnxscript and onnxruntime (the ``dev`` and
``deploy`` extras) and skip cleanly without them.
"""

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from compress.deploy import export_model, load_exported, read_export_record
from compress.deploy.record import DEFAULT_TOLERANCE
from compress.errors import AdcError
from compress.export import main as export_main
from compress.inference import upscale
from compress.io import atomic_torch_save
from compress.sr import main as sr_main
from compress.zoo.adcsr import build_adcsr, official_state_dicts

TOL = 1e-4  # the fp32 parity bound, max abs in the model's [-1, 1] output


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_adcsr("tiny").eval()


def onnx_stack():
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    """A tiny student exported once, dynamic sizes, colour fix outside (what compress.sr needs for tiling)."""
    onnx_stack()
    torch.set_num_threads(1)
    model = tiny()
    path = tmp_path_factory.mktemp("onnx") / "tiny-dyn.onnx"
    res = export_model(model, path, "onnx", 32, dynamic=True, color_fix="outside", exporter="torchscript",
                       source="tests: tiny seed 0")
    return model, res


def test_torch_export_matches_eager_and_records_how_it_was_made(tmp_path, one_thread):
    model = tiny()
    res = export_model(model, tmp_path / "tiny.pt2", "torch-export", 32, source="tests: tiny seed 0")
    assert res.path.is_file() and res.parity_ok and res.max_abs <= TOL
    rec = read_export_record(res.path)  # read back from the file, not from memory
    assert rec == json.loads(json.dumps(res.record))
    assert rec["source"] == "tests: tiny seed 0" and rec["model_class"] == "AdcSR"
    assert rec["lr_size"] == [32, 32] and rec["dynamic"] is False and rec["color_fix"] == "inside"
    assert rec["torch_version"] == torch.__version__ and rec["adc_version"] and rec["scale"] == 4
    assert rec["pad_multiple"] == 16 and rec["params"] == sum(p.numel() for p in model.parameters())

    program = load_exported(res.path)  # a module with the zoo's contract
    lr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert (program(lr) - model(lr)).abs().max() <= TOL
    with pytest.raises(AdcError, match="exported for LR 32x32 only"):
        program(torch.zeros(1, 3, 48, 32))


def test_onnx_dynamic_graph_matches_eager_at_other_sizes(dynamic_onnx, one_thread):
    model, res = dynamic_onnx
    rec = read_export_record(res.path)
    assert rec["dynamic"] and rec["opset"] == 18 and rec["color_fix"] == "outside"
    assert rec["parity"]["ok"] and rec["parity"]["sizes"] == [[32, 32], [16, 32]]
    ort_model = load_exported(res.path)
    g = torch.Generator().manual_seed(3)
    for h, w in ((48, 80), (16, 16)):
        lr = torch.rand(1, 3, h, w, generator=g) * 2 - 1
        with torch.no_grad():
            want = model(lr)  # AdcSR's own forward, colour fix included
            raw = model.up(model.features(lr))
        got = ort_model(lr)  # graph without the fix + the fix applied by the runtime
        ort_model.color_fix = False
        got_raw = ort_model(lr)
        ort_model.color_fix = True
        assert got.shape == (1, 3, 4 * h, 4 * w)
        assert (got_raw - raw).abs().max() <= TOL
        # The fix divides by the SR's std (about 0.3 for this random model): differences grow by std(LR)/std(SR).
        gain = (lr.std((2, 3)) / raw.std((2, 3))).max()
        assert (got - want).abs().max() <= TOL * max(1.0, float(gain))


def test_upscale_runs_an_onnx_graph_with_the_same_tiling_and_colour_fix(dynamic_onnx, one_thread):
    model, res = dynamic_onnx
    lr = torch.rand(3, 45, 70, generator=torch.Generator().manual_seed(1))  # odd sizes: padded, then cropped
    want = upscale(model, lr, tile=32, overlap=16)
    got = upscale(load_exported(res.path), lr, tile=32, overlap=16)
    assert got.shape == want.shape == (3, 180, 280)
    assert (got - want).abs().max() <= 1e-4


def test_a_graph_with_the_colour_fix_inside_runs_without_a_second_fix(tmp_path, one_thread):
    onnx_stack()
    eager = tiny()
    res = export_model(eager, tmp_path / "fix.onnx", "onnx", 16, dynamic=True, color_fix="inside", check=False)
    assert res.record["parity"] is None and "onnxruntime_version" not in res.record  # nothing measured
    assert res.record["color_fix"] == "inside" and "no second fix" in res.record["color_fix_runs"]
    model = load_exported(res.path)
    assert model.fix_in_graph and model.color_fix is False  # nothing left for upscale to apply
    model.color_fix = False  # what upscale does around its tiles: a no-op, the graph keeps its fix
    lr = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = eager(lr[None] * 2 - 1).add(1).mul(0.5).clamp(0, 1)[0]  # AdcSR's own whole-image fix, once
    assert (upscale(model, lr) - want).abs().max() <= 1e-3
    assert upscale(model, lr, tile=16, overlap=0).shape == (3, 128, 192)  # tiled: fixed per tile


@pytest.mark.slow
def test_dynamo_onnx_exporter_dynamic_parity(tmp_path, one_thread):
    """torch.onnx's default (dynamo) exporter, dynamic sizes: slower to export (about a minute here)."""
    onnx_stack()
    res = export_model(tiny(), tmp_path / "dyn.onnx", "onnx", 32, dynamic=True, exporter="dynamo")
    assert res.parity_ok and res.record["exporter"] == "torch.onnx.export(dynamo=True)"
    assert res.record["parity"]["max_abs"] <= TOL


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow),  # not the default: 15 s
                                      "torchscript"])
def test_onnx_static_parity_is_within_fp32s_own_rounding(tmp_path, one_thread, exporter):
    """At LR 16 px the colour fix inside the graph divides by small per-channel stds, which magnifies
    rounding: eager fp32 is itself ~1.7e-4 from an fp64 run there, so the export's distance to eager fp32
    is bounded by a small multiple of that (the summation order of onnxruntime's kernels, which changes
    between releases, is the only difference), and by the export's default tolerance."""
    onnx_stack()
    model = tiny()
    res = export_model(model, tmp_path / "static.onnx", "onnx", 16, exporter=exporter)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        fp32_noise = float((model(lr).double() - copy.deepcopy(model).double()(lr.double())).abs().max())
    assert res.parity_ok and res.record["opset"] == 18 and res.record["parity"]["tolerance"] == DEFAULT_TOLERANCE
    assert res.max_abs <= max(4 * fp32_noise, TOL)
    assert res.record["onnxruntime_version"] == importlib.metadata.version("onnxruntime")
    assert [p.name for p in tmp_path.iterdir()] == ["static.onnx"]  # no temp files or folders left


def test_export_cli_writes_shows_and_refuses_bad_input(tmp_path, capsys, one_thread):
    out = tmp_path / "t.pt2"
    assert export_main(["adcsr", "--size", "tiny", "--format", "torch-export", "--lr-size", "16", "--out", str(out),
                        "--threads", "1"]) == 0
    said = capsys.readouterr()
    assert "wrote" in said.out and "ok tolerance" in said.out and "random weights" in said.err
    assert export_main(["--show", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "zoo:adcsr (tiny, random weights)"

    for argv, msg in ((["adcsr", "--size", "tiny", "--lr-size", "20"], "multiples of 16"),
                      (["adcsr", "--size", "tiny", "--format", "torch-export", "--out", str(tmp_path / "x.onnx")],
                       "must end in .pt2"),
                      (["--show", str(tmp_path / "missing.onnx")], "file not found")):
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and errors == err[-1:] and msg in errors[0]  # one line, last, no traceback
        assert not any("Traceback" in line for line in err)


def _official_weights(folder: Path, seed: int) -> Path:
    net, dec = official_state_dicts(tiny(seed))
    atomic_torch_save(net, folder / "net_params_1.pkl")
    atomic_torch_save(dec, folder / "halfDecoder.ckpt")
    return folder


def _image(folder: Path) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(37, 45, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / "a.png")
    return folder


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.tensor(list(im.getdata()), dtype=torch.int16)


def test_sr_cli_runs_an_exported_onnx_file_like_torch(tmp_path, capsys, one_thread):
    onnx_stack()
    weights = _official_weights(tmp_path / "weights", 7)
    onnx_file = tmp_path / "student.onnx"
    assert export_main([str(weights), "--size", "tiny", "--format", "onnx", "--dynamic", "--color-fix", "outside",
                        "--lr-size", "32", "--exporter", "torchscript", "--out", str(onnx_file)]) == 0
    src = _image(tmp_path / "lr")
    common = ["--size", "tiny", "--input", str(src), "--tile", "32", "--overlap", "16", "--threads", "1"]
    assert sr_main(["--model", str(weights), "--output", str(tmp_path / "torch"), *common]) == 0
    assert sr_main(["--model", str(onnx_file), "--output", str(tmp_path / "ort"), *common]) == 0  # backend implied
    assert "loaded exported onnx" in capsys.readouterr().err
    a, b = _pixels(tmp_path / "torch" / "a.png"), _pixels(tmp_path / "ort" / "a.png")
    assert a.shape == b.shape == (180 * 148, 3)
    assert (a - b).abs().max() <= 1  # outputs within 1e-4 before 8-bit rounding

    for extra, msg in ((["--dtype", "bf16"], "exported graph runs in the precision"),
                       (["--backend", "torch"], "runs with --backend onnxruntime")):
        assert sr_main(["--model", str(onnx_file), "--output", str(tmp_path / "x"), *common, *extra]) == 2
        assert msg in capsys.readouterr().err


def test_export_dynamic_then_sr_with_the_defaults(tmp_path, capsys, one_thread):
    """``adc export MODEL --dynamic`` then ``adc sr --model FILE.onnx``: no flag needed, no dead end."""
    onnx_stack()
    weights = _official_weights(tmp_path / "weights", 7)
    onnx_file = tmp_path / "student.onnx"
    assert export_main([str(weights), "--size", "tiny", "--dynamic", "--lr-size", "32", "--out", str(onnx_file),
                        "--threads", "1"]) == 0
    rec = read_export_record(onnx_file)
    assert rec["color_fix"] == "inside" and rec["exporter"] == "torch.onnx.export(dynamo=False)"
    import onnxruntime

    assert rec["onnxruntime_version"] == onnxruntime.__version__ and rec["parity"]["ok"]
    src = tmp_path / "lr"
    src.mkdir()
    g = torch.Generator().manual_seed(0)  # sides of 16: the in-graph fix sees exactly the image
    Image.fromarray((torch.rand(32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(src / "a.png")
    capsys.readouterr()
    assert sr_main(["--model", str(onnx_file), "--input", str(src), "--output", str(tmp_path / "ort"),
                    "--threads", "1"]) == 0
    assert sr_main(["--model", str(weights), "--size", "tiny", "--input", str(src), "--output", str(tmp_path / "torch"),
                    "--threads", "1"]) == 0
    assert "per tile" not in capsys.readouterr().err
    assert (_pixels(tmp_path / "torch" / "a.png") - _pixels(tmp_path / "ort" / "a.png")).abs().max() <= 1
    assert sr_main(["--model", str(onnx_file), "--input", str(src), "--output", str(tmp_path / "tiled"),
                    "--tile", "32", "--overlap", "16", "--threads", "1"]) == 0
    assert "applied per tile" in capsys.readouterr().err  # said, not refused


@pytest.mark.slow
def test_sr_cli_onnxruntime_backend_exports_on_the_fly(tmp_path, capsys, one_thread):
    onnx_stack()
    weights = _official_weights(tmp_path / "weights", 7)
    src = _image(tmp_path / "lr")
    common = ["--size", "tiny", "--input", str(src), "--tile", "32", "--overlap", "16", "--threads", "1"]
    assert sr_main(["--model", str(weights), "--output", str(tmp_path / "torch"), *common]) == 0
    assert sr_main(["--model", str(weights), "--backend", "onnxruntime", "--output", str(tmp_path / "ort"),
                    *common]) == 0
    assert "exporting the model to ONNX" in capsys.readouterr().err
    assert (_pixels(tmp_path / "torch" / "a.png") - _pixels(tmp_path / "ort" / "a.png")).abs().max() <= 1


def test_records_are_required_and_checked(tmp_path):
    onnx_stack()
    import onnx

    bare = tmp_path / "bare.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), bare)
    with pytest.raises(AdcError, match="no adc export record"):
        read_export_record(bare)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(AdcError, match="not a readable ONNX file"):
        read_export_record(tmp_path / "junk.onnx")
    with pytest.raises(AdcError, match="expected an exported"):
        read_export_record(Path(__file__))
