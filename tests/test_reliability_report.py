"""Re-measuring some sections of reports/reliability.md replaces just those sections."""

from profiling.bench_reliability import merge_sections

REPORT = """# Reliability

Made by `x` in 10 s.

## compress.sr: odd inputs (finding 5)

old sr table

## compress.run: kill -9 points and resume (finding 1, 8)

_placeholder_
"""


def test_a_section_is_replaced_in_place_by_title_and_the_others_kept():
    new = "## compress.run: kill -9 points and resume (findings 1, 8)\n\nnew runner table\n"
    out = merge_sections(REPORT, [new])
    assert "_placeholder_" not in out and "new runner table" in out
    assert "old sr table" in out and out.index("old sr table") < out.index("new runner table")
    assert out.count("## compress.run") == 1 and out.startswith("# Reliability\n\nMade by `x`")


def test_a_new_section_is_appended():
    out = merge_sections(REPORT, ["## Tiling (finding 6)\n\nnumbers\n"])
    assert out.rstrip().endswith("numbers") and "_placeholder_" in out
