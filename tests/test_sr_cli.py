"""``python -m compress.sr``: model specs, files in and out, and user errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from compress.errors import AdcError
from compress.io import atomic_torch_save
from compress.sr import _inputs, load_sr_model, main, plan_outputs
from compress.zoo.adcsr import AdcSR, build_adcsr, official_state_dicts

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path) -> None:
    """Two small readable images (RGB PNG with an odd size, grayscale JPEG) and a corrupt one."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rgb = (torch.rand(27, 41, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb, "RGB").save(folder / "a.png")
    Image.fromarray(rgb[:16, :16, 0], "L").save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_cli_writes_pngs_and_skips_unreadable_files(tmp_path, capsys):
    src, out = tmp_path / "lr", tmp_path / "sr"
    write_images(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rc = main(["--model", "adcsr", "--size", "tiny", "--input", str(src), "--output", str(out),
               "--tile", "32", "--overlap", "16", "--device", "cpu"])  # two tiles for a.png
    captured = capsys.readouterr().err
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [".adc-written", "a.png", "b.png"]  # no temp files left
    with Image.open(out / "a.png") as im:
        assert im.size == (164, 108) and im.mode == "RGB"  # exactly 4x the odd 41x27 input
    with Image.open(out / "b.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"  # grayscale input converted to RGB
    skipped = [line for line in captured.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert "random weights" in captured
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # inputs untouched


def test_tile_batch_defaults_to_one_on_a_cpu_and_follows_the_flag(tmp_path, monkeypatch):
    import compress.inference as inference

    seen = []
    real = inference.upscale_to_png
    monkeypatch.setattr(inference, "upscale_to_png", lambda *a, **kw: seen.append(kw["batch"]) or real(*a, **kw))
    write_images(tmp_path / "lr")
    base = ["--model", "adcsr", "--size", "tiny", "--input", str(tmp_path / "lr" / "a.png"), "--device", "cpu"]
    assert main(base + ["--output", str(tmp_path / "one")]) == 0
    assert main(base + ["--output", str(tmp_path / "three"), "--batch", "3"]) == 0
    assert seen == [1, 3]  # batching buys little on a CPU and costs memory (reports/reliability.md)


def test_cli_summary_line(tmp_path, capsys):
    src = tmp_path / "lr"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"junk")
    rc = main(["--model", "adcsr", "--size", "tiny", "--input", str(src), "--output", str(tmp_path / "sr")])
    out = capsys.readouterr().out
    assert rc == 1  # nothing could be written
    assert "done: 0 written, 1 skipped" in out


def test_cli_refuses_to_overwrite_inputs(tmp_path, capsys):
    src = tmp_path / "lr"
    write_images(src)
    before = (src / "a.png").read_bytes()
    assert main(["--model", "adcsr", "--size", "tiny", "--input", str(src), "--output", str(src)]) == 2
    assert "input folder" in capsys.readouterr().err
    # A single file whose output name is itself.
    assert main(["--model", "adcsr", "--size", "tiny", "--input", str(src / "a.png"), "--output", str(src)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert (src / "a.png").read_bytes() == before


def test_recursive_inputs_mirror_folders_and_skip_earlier_outputs(tmp_path):
    src = tmp_path / "lr"
    write_images(src / "sub")
    Image.new("RGB", (8, 8)).save(src / "sub" / "a.jpg")  # same stem as sub/a.png
    out = src / "sr"  # output folder inside the input tree, holding an earlier run's output
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "old.png")
    root, files = _inputs(src, out, recursive=True)
    assert [f.relative_to(src).as_posix() for f in files] == ["sub/a.jpg", "sub/a.png", "sub/b.jpg", "sub/broken.png"]
    plan = [p.relative_to(out).as_posix() for p in plan_outputs(root, files, out)]
    assert plan == ["sub/a.png", "sub/a.png.png", "sub/b.png", "sub/broken.png"]
    with pytest.raises(AdcError, match="no images"):
        _inputs(src, out, recursive=False)


def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path):
    src = tmp_path / "lr"
    write_images(src)
    proc = subprocess.run([sys.executable, "-m", "compress.sr", "--model", "no-such-model", "--input", str(src),
                           "--output", str(tmp_path / "sr")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-model" in lines[0]


def test_official_dir_spec_loads_the_highest_epoch(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_adcsr("tiny")
    net, dec = official_state_dicts(source)
    weights = tmp_path / "weights"
    atomic_torch_save(net, weights / "net_params_200.pkl")
    atomic_torch_save(dec, weights / "halfDecoder.ckpt")
    torch.manual_seed(1)
    older, _ = official_state_dicts(build_adcsr("tiny"))
    atomic_torch_save(older, weights / "net_params_90.pkl")  # lower epoch: must not be picked

    model = load_sr_model(weights, "tiny", "cpu", log=lambda m: None)
    assert isinstance(model, AdcSR) and not model.training
    got, want = model.state_dict(), source.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    with pytest.raises(AdcError, match="--size"):  # tiny weights into the full-size model
        load_sr_model(weights, "full", "cpu", log=lambda m: None)

    src = tmp_path / "lr"
    src.mkdir()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(src / "flat.png")  # flat: colour match must not give NaN
    assert main(["--model", str(weights), "--size", "tiny", "--input", str(src / "flat.png"),
                 "--output", str(tmp_path / "sr")]) == 0
    assert "net_params_200.pkl" in capsys.readouterr().err
    with Image.open(tmp_path / "sr" / "flat.png") as im:
        assert im.size == (64, 64)


def test_run_folder_spec_loads_the_runs_last_student(tmp_path):
    from compress.prune import base_model, remove_conditioning, widen_module
    from compress.student import StudentState, compose_student, save_student

    torch.manual_seed(0)
    unet, r0 = base_model("compress.zoo.sd:build_unet", size="tiny")
    decoder, d0 = base_model("compress.zoo.sd:build_vae_decoder", size="tiny")
    unet, r1 = remove_conditioning(unet)
    unet, r2 = widen_module(unet, "conv_in", in_channels=12)
    unet, r3 = widen_module(unet, "conv_out", out_channels=decoder.mid_block.resnets[0].in_channels)
    student = compose_student(unet, decoder)
    save_student(tmp_path / "run" / "02-remove" / "student",
                 StudentState(student, decoder, {"unet": [r0, r1, r2, r3], "decoder": [d0]}))
    lr = torch.rand(1, 3, 32, 32) * 2 - 1
    for spec in (tmp_path / "run", tmp_path / "run" / "02-remove" / "student"):
        loaded = load_sr_model(spec, "tiny", "cpu", log=lambda m: None)
        assert isinstance(loaded, AdcSR)
        assert torch.equal(loaded(lr), student.eval()(lr))


def test_unknown_folder_is_one_clear_error(tmp_path):
    with pytest.raises(AdcError, match="neither official AdcSR weights"):
        load_sr_model(tmp_path, "tiny", "cpu")