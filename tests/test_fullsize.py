"""The full-size proof as a test: every stage of ``recipes/adcsr.yaml`` at full width, on synthetic
weights written in the official layouts (slow: about half an hour and ~19 GB of RAM on a 2-core CPU)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_adcsr_recipe_runs_at_full_width_on_official_layouts(tmp_path):
    from profiling.fullsize import main

    report = tmp_path / "fullsize.md"
    assert main(["--weights", str(tmp_path / "weights"), "--work", str(tmp_path / "work"), "--steps", "1",
                 "--out", str(report)]) == 0
    done = {json.loads(p.read_text())["stage"]: json.loads(p.read_text())
            for p in (tmp_path / "work" / "run").glob("*/DONE.json")}
    assert {"analyse", "remove", "prune", "pretrain_decoder", "distill", "evaluate", "profile", "report"} <= set(done)
    for stage, d in done.items():
        assert d["memory"]["peak_anon_mib"] > 0, stage  # every stage measured its own memory
    # the run's student is AdcSR's size (reports/complexity.md: 456.07 M params, 549.50 G MACs at 128 -> 512)
    rows = {r["model"]: r for r in done["profile"]["artifacts"]["rows"]}
    assert rows["student"]["params"] == pytest.approx(456.07e6, rel=1e-3)
    assert rows["student"]["macs_total"] < 0.25 * rows["teacher"]["macs_total"]
    text = report.read_text()
    assert "| distill |" in text and "synthetic" in text
