"""The run report's parts that need no run: goals and their verdicts, the HTML twin, the environment record."""

import base64

import pytest

from compress.errors import AdcError
from compress.stages.report import GOALS, ReportConfig, _summary
from compress.stages.report_html import markdown_to_html

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
ART = {"evaluate": {"n_images": 6, "per_image": "05-evaluate/per_image.csv",
                    "means": {"bicubic": {"psnr": 26.28}, "teacher": {"psnr": 25.10}, "student": {"psnr": 24.75}},
                    "student_vs_teacher": {"psnr_student_vs_teacher": 29.0}},
       "profile": {"ratios": {"params": 0.275, "macs_total": 0.209}, "latency": None, "latency_device": "cpu",
                   "rows": [{"model": "teacher", "params": 6.65e6, "macs_total": 1.97e9},
                            {"model": "student", "params": 1.83e6, "macs_total": 0.41e9}]}}


def test_the_summary_has_one_number_per_claim_and_a_verdict_per_goal(tmp_path):
    goals = {"min_psnr_y_gap_to_teacher_db": -0.5, "min_student_vs_teacher_psnr_y_db": 30.0, "max_macs_ratio": 0.3,
             "min_speedup": 2.0}
    text = "\n".join(_summary(ART, tmp_path, ReportConfig(goals=goals)))
    assert text.count("Student SR vs HR") == 1 and "PSNR-Y **24.75 dB** (teacher 25.10 dB, bicubic 26.28 dB)" in text
    assert "[per_image.csv](05-evaluate/per_image.csv)" in text and "on its 6 eval pairs" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["student PSNR-Y minus teacher PSNR-Y (both against HR)"].endswith("| >= -0.50 dB | -0.35 dB | **reached** |")
    assert rows["student SR against teacher SR, PSNR-Y"].endswith("| >= 30.00 dB | 29.00 dB | not reached |")
    assert rows["student MACs / teacher MACs"].endswith("| <= 0.300x | 0.209x | **reached** |")
    assert rows["teacher latency / student latency"].endswith("| – | not measured |")


def test_unknown_goals_are_refused_with_a_suggestion():
    with pytest.raises(AdcError, match=r"goals\.max_mac_ratio: unknown goal; did you mean 'max_macs_ratio'"):
        ReportConfig(goals={"max_mac_ratio": 0.3}).validate("report")
    assert set(GOALS) >= {"min_psnr_y_gap_to_teacher_db", "min_student_vs_teacher_psnr_y_db", "max_macs_ratio"}


def test_html_twin_inlines_images_and_small_linked_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "curve.png").write_bytes(PNG)
    (tmp_path / "sub" / "per_image.csv").write_text("name,psnr\na,1\n")
    md = ("# Title\n\nSome **bold** and `a|b <code>` text; [scores](sub/per_image.csv), [env](#environment).\n\n"
          "| stage | curve |\n|---|---|\n| distill -> x | ![distill](sub/curve.png) |\n\n- one\n- two\n\n"
          "## Environment\n\n![missing](nope.png)\n")
    out = markdown_to_html(md, tmp_path)
    assert '<h1 id="title">Title</h1>' in out and '<h2 id="environment">' in out
    assert "<strong>bold</strong>" in out and "<code>a|b &lt;code&gt;</code>" in out
    assert '<img alt="distill" src="data:image/png;base64,' in out and "<th>stage</th>" in out
    assert "<td>distill -&gt; x</td>" in out and "<li>two</li>" in out
    assert 'download="per_image.csv"' in out and 'href="data:text/csv;base64,' in out
    assert '<a href="#environment">env</a>' in out and 'src="nope.png"' in out  # missing file: left as a link


def test_environment_differences_ignore_the_date_and_name_what_changed():
    from compress.environment import collect, differences

    env = collect()
    assert env["torch"] and env["python"] and env["adc"] and "date" in env and env["torch_threads"] >= 1
    later = {**env, "date": "2099-01-01T00:00:00+00:00"}
    assert differences({"analyse": env, "remove": env}, later) == []
    upgraded = {**env, "torch": "9.9.9"}
    assert differences({"analyse": env, "remove": env}, upgraded) == [f"torch: {env['torch']} (analyse, remove) -> 9.9.9"]


def test_goals_without_measurements_say_so(tmp_path):
    text = "\n".join(_summary({}, tmp_path, ReportConfig(goals={"max_macs_ratio": 0.3})))
    assert text.startswith("## Summary") and "| <= 0.300x | – | not measured |" in text
