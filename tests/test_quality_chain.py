"""The report's quality chain, built from stage artifacts alone (no training)."""

from compress.stages.report import quality_chain

ART = {
    "pretrain_decoder": {"measured_values": {"teacher_vae_psnr_y": 27.32, "decoder_psnr_y_before": 15.40,
                                             "decoder_psnr_y_after": 22.30, "images": 4}},
    "distill": {"measured_values": {
        "before": {"feature_l1": 0.2, "psnr_student_vs_teacher": 20.0, "psnr_student_vs_hr": 19.5},
        "after": {"feature_l1": 0.13, "psnr_student_vs_teacher": 25.1, "psnr_student_vs_hr": 22.4}, "images": 4}},
    "evaluate": {"n_images": 6, "means": {"bicubic": {"psnr": 26.28}, "teacher": {"psnr": 25.75},
                                           "student": {"psnr": 22.00}},
                 "student_vs_teacher": {"psnr_student_vs_teacher": 25.10}},
}


def _rows(lines):
    """'#' -> the row's cells."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {r[0]: r[1:] for r in cells[1:]}


def test_the_chain_has_every_link_with_its_numbers():
    lines, csv = quality_chain(ART)
    assert lines[0] == "## Quality chain"
    rows = _rows(lines)
    assert list(rows) == ["1", "2", "3a", "3b", "4a", "4b", "4c", "4d"]
    assert rows["1"][1:4] == ["first 4 eval HR", "–", "27.32 dB"] and "ceiling" in rows["1"][0]
    assert rows["2"][1:] == ["first 4 eval HR", "15.40 dB", "22.30 dB", "-5.02 dB vs the ceiling"]
    assert rows["3a"][1:] == ["first 4 eval pairs", "0.2000", "0.1300", "-35.0 %"]
    assert rows["3b"][2:4] == ["20.00 dB", "25.10 dB"] and rows["4a"][2:4] == ["19.50 dB", "22.40 dB"]
    assert rows["4b"][1:4] == ["all 6 eval pairs", "–", "25.75 dB"]
    assert rows["4c"][3:] == ["22.00 dB", "-3.75 dB vs the teacher"]
    assert rows["4d"][3] == "25.10 dB"
    assert {(r["item"].split()[0], r["metric"], r["value"]) for r in csv} >= {
        ("1", "after", 27.32), ("2", "before", 15.40), ("2", "after", 22.30), ("3a", "after", 0.13), ("4c", "after", 22.0)}
    assert all(r["section"] == "quality_chain" for r in csv)


def test_links_whose_stage_did_not_run_say_so():
    art = {"evaluate": ART["evaluate"]}
    rows = _rows(quality_chain(art, skipped={"distill": ["weights"]})[0])
    assert rows["1"][1] == rows["2"][1] == "not run" and rows["1"][2:] == ["", "", ""]
    assert rows["3a"][1] == rows["3b"][1] == rows["4a"][1] == "skipped (see Stopped early)"
    assert rows["4c"][3] == "22.00 dB"
    rows = _rows(quality_chain({"pretrain_decoder": {"steps": 3}, "distill": {"measured": {"x": "1 -> 2"}}})[0])
    assert rows["2"][1] == "not measured (no eval pairs)"
    assert rows["3a"][1] == "not recorded (the stage ran with an older adc)"
    assert rows["4b"][1] == "not run"
    teacherless = {"evaluate": {"n_images": 6, "means": {"student": {"psnr": 22.0}}}}
    rows = _rows(quality_chain(teacherless)[0])
    assert rows["4b"][1] == "not measured (method not in evaluate.methods)" and rows["4c"][3:] == ["22.00 dB", ""]
