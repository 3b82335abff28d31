"""The published tables are generated from their results lines: stale tables fail, the metrics are the stated ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.eval.results import MARK, Table, machine_text, median_spread, ratio, regenerate, regenerate_text, render
from peakllm.eval.tables import TABLES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def test_committed_tables_equal_what_their_data_gives(tmp_path):
    """Regenerate every page into a temp folder; a committed page that differs is stale (run `make results`)."""
    stale, tables = [], 0
    for i, pages in enumerate(([RESULTS], [ROOT / "README.md"])):  # two README.md: apart
        done = regenerate(pages, RESULTS, TABLES, tmp_path / str(i))
        tables += done["tables"]
        stale += [p for p in done["pages"] if (tmp_path / str(i) / Path(p).name).read_text() != Path(p).read_text()]
    assert tables >= 20  # the pages do carry generated tables
    assert not stale, f"generated tables out of date in {stale}: run `make results`"


def test_every_table_a_page_names_exists_and_every_defined_table_is_published():
    pages = list(RESULTS.glob("*.md")) + [ROOT / "README.md"]
    named = {m.group("name") for p in pages for m in MARK.finditer(p.read_text())}
    assert named == set(TABLES)


def test_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    ours, theirs = [10.0, 20.0, 30.0], [20.0, 10.0, 31.0]
    # per round: 0.5, 2.0, 0.97 -> median 0.97; the ratio of medians would be 20/20 = 1.00
    assert ratio(ours, theirs) == "0.97 (0.50–2.00)"
    with pytest.raises(PeakError, match="same number of rounds"):
        ratio([1.0, 2.0], [1.0])


def test_median_spread():
    assert median_spread([3.0, 1.0, 2.0]) == "2 (1–3)"
    assert median_spread([1.234], ".2f") == "1.23"
    assert median_spread([]) == ""


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_regeneration_rewrites_only_the_marked_blocks_and_names_the_data(tmp_path):
    _write(tmp_path / "r.jsonl", [
        {"x": 1.5, "commit": "a" * 40, "machine": {"cpu": "CPU9", "flags": ["avx2", "fma"]}},
        {"x": 2.5},
        {"x": 9.0, "commit": "b" * 40, "provenance": "backfilled",
         "machine": {"cpu": "OLD", "flags": [], "source": "README"}}])
    tables = {"t": Table("r.jsonl", [("x", lambda r: r["x"])], where=lambda r: r["x"] < 5)}
    page = "intro 7\n<!-- table: t -->\nold 123\n<!-- end table -->\noutro\n"
    text = regenerate_text(page, tmp_path, tables)
    assert text.startswith("intro 7\n<!-- table: t -->\n| x |\n|---|\n| 1.5 |\n| 2.5 |\n")
    assert "old 123" not in text and text.endswith("<!-- end table -->\noutro\n")
    assert "lines 1–2" in text and "aaaaaaa" in text and "bbbbbbb" not in text  # line 3 filtered out
    assert "CPU9, avx2" in text and "not recorded" in text
    assert regenerate_text(text, tmp_path, tables) == text  # idempotent


def test_backfilled_and_missing_machines_are_said_so():
    assert machine_text({}) == "not recorded"
    assert machine_text({"machine": {"cpu": "X", "flags": ["avx512f"], "source": "README"}}) == "X, avx512f (backfilled)"
    assert machine_text({"machine": "2-core VM", "machine_backfilled": {"cpu": "Y", "flags": []}}) == "Y"


def test_a_bad_table_writes_no_page(tmp_path):
    _write(tmp_path / "r.jsonl", [{"x": 1}])
    good, bad = tmp_path / "a.md", tmp_path / "b.md"
    good.write_text("<!-- table: t -->\n<!-- end table -->\n")
    bad.write_text("<!-- table: nope -->\n<!-- end table -->\n")
    tables = {"t": Table("r.jsonl", [("x", lambda r: r["x"])])}
    with pytest.raises(PeakError, match="no generated table named 'nope'"):
        regenerate([tmp_path], tmp_path, tables)
    assert good.read_text() == "<!-- table: t -->\n<!-- end table -->\n"
    with pytest.raises(PeakError, match="no line of r.jsonl matches"):
        render("t", tmp_path, {"t": Table("r.jsonl", [("x", lambda r: r["x"])], where=lambda r: False)})
    with pytest.raises(PeakError, match="not found"):
        render("t", tmp_path / "missing", tables)


def test_report_cli_docs_mode(tmp_path, capsys):
    _write(tmp_path / "r.jsonl", [{"x": 1}])
    page = tmp_path / "p.md"
    page.write_text("<!-- table: prune -->\n<!-- end table -->\n")
    assert main(["report", "--docs", str(page), "--data", str(RESULTS), "--output", str(tmp_path / "out")]) == 0
    assert "| sparsegpt | 50% |" in (tmp_path / "out" / "p.md").read_text()
    assert page.read_text() == "<!-- table: prune -->\n<!-- end table -->\n"  # --output: the page itself untouched
    assert main(["report", str(tmp_path / "r.jsonl"), "--docs", str(page)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["report"]) == 2
