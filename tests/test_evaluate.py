"""``python -m compress.evaluate`` and ``evaluate_folders``: pairing, reports, bad input, learned metrics.

Learned metrics are tested without pyiqa: a stub package stands in for it, so the offline
and weights-on-disk logic is exercised whether or not pyiqa is installed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from compress.errors import AdcError
from compress.evaluate import evaluate_folders, main, pair_folders, parse_metric_names, summarize, write_reports
from compress.metrics import load_image, psnr_y, ssim_y
from compress.metrics.learned import LEARNED_METRICS, OFFLINE_ENV, open_learned_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "realsr"
SAMPLE_NAMES = ["Canon_001_LR4.png", "Canon_015_LR4.png", "Canon_047_LR4.png",
                "Nikon_006_LR4.png", "Nikon_025_LR4.png", "Nikon_033_LR4.png"]


def _write_images(folder: Path, names: list[str], size=(24, 20), seed=0) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for name in names:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays.append(arr)
    return arrays


@pytest.fixture
def no_pyiqa(tmp_path, monkeypatch):
    """A directory whose ``pyiqa`` raises ImportError, for subprocesses (PYTHONPATH) and in-process."""
    stub = tmp_path / "no_pyiqa"
    stub.mkdir()
    (stub / "pyiqa.py").write_text("raise ImportError('pyiqa hidden by the test')\n")
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    return stub


def _cli(args: list[str], pythonpath: Path) -> subprocess.Popen:
    """Start ``python -m compress.evaluate`` in a fresh process (one thread: the cores are shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.Popen([sys.executable, "-m", "compress.evaluate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_sample_set_is_shipped():
    for sub, size in (("LR", (128, 128)), ("HR", (512, 512))):
        files = sorted(p.name for p in (SAMPLES / sub).glob("*.png"))
        assert files == SAMPLE_NAMES
        for name in files:
            with Image.open(SAMPLES / sub / name) as img:
                assert img.size == size and img.mode == "RGB"
    assert "RealSR" in (ROOT / "data" / "samples" / "README.md").read_text()
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


def test_cli_on_samples_writes_csvs_and_summary(tmp_path, no_pyiqa):
    """Bicubic x4 of the sample LR, written under other names: pairs by sorted order, reports written."""
    sr_dir = tmp_path / "sr"
    sr_dir.mkdir()
    for i, name in enumerate(SAMPLE_NAMES):
        with Image.open(SAMPLES / "LR" / name) as lr:
            lr.resize((512, 512), Image.BICUBIC).save(sr_dir / f"{i:02d}_bicubic.png")
    (sr_dir / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "report"
    rc, stdout, stderr = _finish(_cli(["--sr", str(sr_dir), "--hr", str(SAMPLES / "HR"), "--out", str(out),
                                       "--metrics", "psnr,ssim,lpips,fid"], no_pyiqa))
    assert rc == 0, stderr
    per_image = pd.read_csv(out / "per_image.csv")
    assert list(per_image.columns) == ["sr", "hr", "psnr", "ssim"]
    assert list(per_image["hr"]) == SAMPLE_NAMES
    assert list(per_image["sr"]) == [f"{i:02d}_bicubic.png" for i in range(6)]
    sr0, hr0 = load_image(sr_dir / "00_bicubic.png"), load_image(SAMPLES / "HR" / SAMPLE_NAMES[0])
    assert per_image["psnr"][0] == pytest.approx(psnr_y(sr0, hr0).item(), abs=1e-5)
    assert per_image["ssim"][0] == pytest.approx(ssim_y(sr0, hr0).item(), abs=1e-5)
    assert per_image["psnr"].between(15, 40).all() and per_image["ssim"].between(0, 1).all()

    summary = pd.read_csv(out / "summary.csv").set_index("metric")
    assert list(summary.index) == ["psnr", "ssim", "lpips", "fid"]
    assert summary.loc["psnr", "value"] == pytest.approx(per_image["psnr"].mean(), abs=1e-5)
    assert (summary["n_images"] == 6).all()
    for name in ("lpips", "fid"):
        assert summary.loc[name, "status"] == "unavailable (pyiqa not installed)"
        assert pd.isna(summary.loc[name, "value"])
    md = (out / "summary.md").read_text()
    assert "images: 6" in md and "| LPIPS | - | lower | unavailable (pyiqa not installed) |" in md
    assert "SR evaluation" in stdout and [p.name for p in out.iterdir() if p.name.startswith(".")] == [".adc-written"]


def _bad_input(tmp: Path, case: str) -> tuple[list[str], str]:
    """Arguments for one bad-input case, and a fragment the one-line error must contain."""
    good = tmp / "good"
    _write_images(good, ["a.png", "b.png"])
    if case == "missing_sr":
        return ["--sr", str(tmp / "nope"), "--hr", str(good)], "SR folder not found"
    if case == "missing_hr":
        return ["--sr", str(good), "--hr", str(tmp / "nope")], "HR folder not found"
    if case == "empty":
        (tmp / "empty").mkdir()
        (tmp / "empty" / "readme.txt").write_text("x")
        return ["--sr", str(tmp / "empty"), "--hr", str(good)], "SR folder has no images"
    if case == "count":
        _write_images(tmp / "three", ["a.png", "b.png", "c.png"])
        return ["--sr", str(tmp / "three"), "--hr", str(good)], "image count mismatch: 3 SR images"
    if case == "unreadable":
        (tmp / "bad").mkdir()
        _write_images(tmp / "bad", ["a.png"])
        (tmp / "bad" / "b.png").write_bytes(b"\x89PNG garbage")
        return ["--sr", str(tmp / "bad"), "--hr", str(good)], "b.png: unreadable image"
    if case == "size":
        _write_images(tmp / "big", ["a.png", "b.png"], size=(48, 40))
        return ["--sr", str(tmp / "big"), "--hr", str(good)], "size mismatch"
    if case == "metric":
        return ["--sr", str(good), "--hr", str(good), "--metrics", "psnr,vmaf"], "unknown metric 'vmaf'"
    raise AssertionError(case)


BAD_CASES = ["missing_sr", "missing_hr", "empty", "count", "unreadable", "size", "metric"]


def test_cli_bad_input_one_line_exit_2(tmp_path, no_pyiqa):
    """Each bad input, in its own process (started together to save time): exit 2, one line, no traceback."""
    runs = {}
    for case in BAD_CASES:
        case_dir = tmp_path / case
        case_dir.mkdir()
        args, fragment = _bad_input(case_dir, case)
        runs[case] = (_cli([*args, "--out", str(case_dir / "out")], no_pyiqa), fragment, case_dir)
    for case, (proc, fragment, case_dir) in runs.items():
        rc, _, stderr = _finish(proc)
        lines = stderr.strip().splitlines()
        assert rc == 2, (case, stderr)
        assert len(lines) == 1, (case, stderr)
        assert lines[0].startswith("error: ") and fragment in lines[0], (case, lines[0])
        assert "Traceback" not in stderr and not (case_dir / "out").exists(), case


def test_truncated_image_is_adcerror(tmp_path, no_pyiqa):
    """Header readable (passes the size check), pixel data cut: caught when loading, not as a traceback."""
    _write_images(tmp_path / "hr", ["a.png"], size=(64, 64))
    (tmp_path / "sr").mkdir()
    data = (tmp_path / "hr" / "a.png").read_bytes()
    (tmp_path / "sr" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdcError, match="unreadable image"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hr", metrics="psnr")
    assert main(["--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--metrics", "psnr"]) == 2


def test_evaluate_folders_identical_and_metric_names(tmp_path, no_pyiqa):
    _write_images(tmp_path / "x", ["1.png", "2.png"])
    df = evaluate_folders(tmp_path / "x", tmp_path / "x", metrics=["SSIM", "psnr", "maniqa-pipal"])
    assert list(df.columns) == ["sr", "hr", "ssim", "psnr"]
    assert np.allclose(df["psnr"], 80.0) and np.allclose(df["ssim"], 1.0)
    assert df.attrs["unavailable"] == {"maniqa": "unavailable (pyiqa not installed)"}
    assert list(summarize(df)["metric"]) == ["ssim", "psnr", "maniqa"]
    assert parse_metric_names("psnr, psnr ,clip-iqa") == ["psnr", "clipiqa"]
    with pytest.raises(AdcError, match="no metrics"):
        parse_metric_names(" , ")
    with pytest.raises(AdcError, match="not a folder"):
        write_reports(df, tmp_path / "x" / "1.png")
    assert [a.name for a, _ in pair_folders(tmp_path / "x", tmp_path / "x")] == ["1.png", "2.png"]


# ---- learned metrics through a stub pyiqa --------------------------------------------------------

_STUB = '''
import os
import torch

__version__ = "0.0-stub"
CREATED = []


class _Metric(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x, y=None):
        if self.name == "fid":
            assert isinstance(x, str) and isinstance(y, str)
            return 12.5
        if self.name == "niqe":
            raise RuntimeError("model exploded")
        return torch.tensor([[float(x.mean())]])


def create_metric(name, device=None, **kwargs):
    CREATED.append((name, os.environ.get("HF_HUB_OFFLINE"), str(device)))
    if name == "musiq":  # pretend a weight file is missing from adc's table: pyiqa would download it
        torch.hub.download_url_to_file("https://example.invalid/musiq.pth", "/nonexistent/musiq.pth")
    return _Metric(name)
'''


@pytest.fixture
def stub_pyiqa(tmp_path, monkeypatch):
    pkg = tmp_path / "stub" / "pyiqa"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(_STUB))
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for k in OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    yield torch_home / "hub"
    sys.modules.pop("pyiqa", None)


def _put_weights(hub: Path, name: str) -> None:
    for alternatives in LEARNED_METRICS[name].files:
        loc = alternatives[0]
        assert loc.startswith("torchhub:")
        path = hub / loc[len("torchhub:"):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fake weights")


def test_learned_metrics_need_weights_on_disk_and_never_download(stub_pyiqa, tmp_path):
    hub = stub_pyiqa
    _put_weights(hub, "lpips")
    _put_weights(hub, "musiq")
    _put_weights(hub, "fid")
    ready, unavailable = open_learned_metrics(["lpips", "dists", "musiq", "fid"], device="cpu")
    assert sorted(ready) == ["fid", "lpips"]
    assert unavailable["dists"].startswith("unavailable (weights not found: ")
    assert str(hub / "pyiqa" / "DISTS_weights-f5e65c96.pth") in unavailable["dists"]
    assert "download refused" in unavailable["musiq"]
    import pyiqa

    created = {name: offline for name, offline, _ in pyiqa.CREATED}
    assert created == {"lpips": "1", "musiq": "1", "fid": "1"}  # created under HF offline mode
    assert "HF_HUB_OFFLINE" not in os.environ  # ... which is restored afterwards
    assert torch.hub.download_url_to_file.__name__ == "download_url_to_file"

    _write_images(tmp_path / "sr", ["a.png", "b.png"], seed=1)
    _write_images(tmp_path / "hr", ["a.png", "b.png"], seed=2)
    _put_weights(hub, "niqe")
    df = evaluate_folders(tmp_path / "sr", tmp_path / "hr", metrics="psnr,lpips,dists,niqe,fid", device="cpu")
    assert list(df.columns) == ["sr", "hr", "psnr", "lpips"]
    assert df.attrs["unavailable"]["niqe"] == "failed on a.png (RuntimeError: model exploded)"
    expected = load_image(tmp_path / "sr" / "a.png").mean().item()
    assert df["lpips"][0] == pytest.approx(expected, abs=1e-6)
    summary = summarize(df).set_index("metric")
    assert summary.loc["fid", "value"] == 12.5 and summary.loc["fid", "status"] == "ok"
    assert summary.loc["dists", "status"].startswith("unavailable (weights not found")
    assert df.attrs["pyiqa"] == "0.0-stub"


# ---- pairing by name, and nothing computed -------------------------------------------------------


def _copies(src: Path, dst: Path, names: dict[str, str]) -> None:
    """Copy src/<hr name> to dst/<sr name> for each (hr name -> sr name)."""
    dst.mkdir(parents=True, exist_ok=True)
    for hr_name, sr_name in names.items():
        (dst / sr_name).write_bytes((src / hr_name).read_bytes())


def test_pairs_are_by_name_whatever_the_sorted_order(tmp_path, no_pyiqa):
    """SR copies of each HR under other names: a right pairing gives 80 dB (identical) for every image."""
    hr = tmp_path / "hr"
    _write_images(hr, ["img1.png", "img2.png", "img10.png"])
    _copies(hr, tmp_path / "same", {"img1.png": "img1.bmp", "img2.png": "img2.bmp", "img10.png": "img10.bmp"})
    _copies(hr, tmp_path / "affix", {"img1.png": "1_sr.png", "img2.png": "2_sr.png", "img10.png": "10_sr.png"})
    for sr, rule in (("same", "by file name"), ("affix", "by file name without the fixed parts (SR *_sr, HR img*)")):
        df = evaluate_folders(tmp_path / sr, hr, metrics="psnr")
        assert df.attrs["pairing"] == rule and df.attrs["pairing_warning"] is None
        assert np.allclose(df["psnr"], 80.0), (sr, list(zip(df["sr"], df["hr"])))
    # Sorted order alone would have paired 10_sr with img1: the mistake the rule prevents.
    assert sorted(p.name for p in (tmp_path / "affix").iterdir())[0] == "10_sr.png"


def test_partial_name_match_is_an_error_naming_the_file(tmp_path, no_pyiqa):
    _write_images(tmp_path / "hr", ["a.png", "b.png"])
    _write_images(tmp_path / "sr", ["a.png", "z.png"])
    with pytest.raises(AdcError, match=r"z\.png: no HR image named z\.\* in .* \(1 of 2 names match"):
        pair_folders(tmp_path / "sr", tmp_path / "hr")


def test_unrelated_names_pair_by_sorted_order_with_a_visible_warning(tmp_path, no_pyiqa, capsys):
    _write_images(tmp_path / "hr", ["one.png", "two.png"])
    _write_images(tmp_path / "sr", ["cat.png", "dog.png"], seed=1)
    out = tmp_path / "report"
    assert main(["--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--metrics", "psnr",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no SR file name matches an HR one; paired by sorted order")
    assert "paired by sorted order" in (out / "summary.md").read_text()
    summary = pd.read_csv(out / "summary.csv")
    assert summary["pairing"].str.contains("WARNING").all()


def test_nothing_computed_is_exit_2_and_writes_nothing(tmp_path, no_pyiqa, capsys):
    _write_images(tmp_path / "x", ["a.png"])
    out = tmp_path / "report"
    assert main(["--sr", str(tmp_path / "x"), "--hr", str(tmp_path / "x"), "--metrics", "lpips",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: no metric could be computed (lpips: unavailable (pyiqa not installed)); nothing written; "
        'learned metrics lpips not computed (pyiqa is not installed); to enable them: pip install -e ".[iqa]"')
    assert not out.exists()


# ---- a subset of SR images against a larger HR folder; how to enable learned metrics --------------


def test_a_subset_of_sr_images_is_scored_by_name_against_a_larger_hr_folder(tmp_path, no_pyiqa, capsys):
    hr = tmp_path / "hr"
    _write_images(hr, ["a.png", "b.png", "c.png", "d.png"])
    _copies(hr, tmp_path / "sr", {"d.png": "d.png", "b.png": "b.png"})
    out = tmp_path / "report"
    assert main(["--sr", str(tmp_path / "sr"), "--hr", str(hr), "--metrics", "psnr", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"info: scoring the 2 SR images by name against {hr}; its other 2 HR images have no SR image of "
                   "the same name and are ignored"]
    per_image = pd.read_csv(out / "per_image.csv")
    assert list(zip(per_image["sr"], per_image["hr"])) == [("b.png", "b.png"), ("d.png", "d.png")]
    assert np.allclose(per_image["psnr"], 80.0)  # the right pairs: identical images
    assert "its other 2 HR images have no SR image" in (out / "summary.md").read_text()
    # an SR image without a same-named HR image is still an error, and so is a subset with no name in common
    _write_images(tmp_path / "sr2", ["a.png", "z.png"])
    with pytest.raises(AdcError, match=r"z\.png: no HR image named z\.\* in"):
        pair_folders(tmp_path / "sr2", hr)
    _write_images(tmp_path / "sr3", ["x.png", "y.png"])
    with pytest.raises(AdcError, match=r"no SR file name matches an HR one .* paired by name only"):
        pair_folders(tmp_path / "sr3", hr)


def test_unavailable_learned_metrics_get_one_line_on_how_to_enable_them(tmp_path, no_pyiqa, capsys):
    _write_images(tmp_path / "x", ["a.png"])
    assert main(["--sr", str(tmp_path / "x"), "--hr", str(tmp_path / "x"), "--metrics", "psnr,lpips,fid",
                 "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    hub = torch.hub.get_dir()
    assert len(err) == 1 and err[0].startswith('info: learned metrics lpips, fid not computed (pyiqa is not installed); '
                                               'to enable them: pip install -e ".[iqa]" and put their weight files')
    assert f"{hub}/pyiqa" in err[0] and f"{hub}/checkpoints" in err[0]  # where learned.py looks for them


def test_the_hint_for_missing_weights_names_their_folder(stub_pyiqa):
    from compress.evaluate import enable_hint

    hint = enable_hint({"dists": "unavailable (weights not found: ...)", "psnr": "x",
                        "niqe": "failed on a.png (RuntimeError: model exploded)"})
    assert hint.startswith("learned metrics dists not computed (weights not on disk); to enable them: put their "
                           f"weight files (pyiqa's file names; adc never downloads) in {stub_pyiqa / 'pyiqa'}, "
                           f"{stub_pyiqa / 'checkpoints'} ")
    assert "pip install" not in hint and enable_hint({"niqe": "failed on a.png (...)"}) is None
