"""`advmnist leaderboard`: every robust evaluation under the runs folder, one table per threat model and
eps, most robust first, as Markdown and escaped HTML linked to each record."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from advmnist.cli import main
from advmnist.leaderboard import collect, markdown, tables


def _record(folder: Path, name: str, model: str, eps: float, robust: float, n: int = 1000, flagged: bool = False,
            certified: float | None = None, where: str = "eval/robust.json") -> Path:
    path = folder / name / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "kind": "robust-evaluate", "model": model, "eps": eps, "norm": "linf", "n": n, "clean_accuracy": 99.0,
        "robust_accuracy": robust, "settings": {"eps": eps, "norm": "linf", "ensemble": "standard", "steps": None,
                                                "queries": None, "n": n},
        "certified": None if certified is None else {"method": "ibp", "certified_accuracy": certified},
        "masking": {"flagged": flagged}, "provenance": {"time": "2026-12-04T10:00:00+00:00", "commit": "abc1234"}}))
    return path


def test_rows_from_every_record_grouped_by_eps_and_sorted(tmp_path):
    _record(tmp_path, "a-run", "strided", 0.3, 86.8, flagged=True)
    _record(tmp_path, "b-run", "strided-wide", 0.3, 91.6, certified=0.0)
    _record(tmp_path, "b-run", "strided-wide", 0.1, 97.0, n=200, where="attack-cache/robust-0123.json")
    (tmp_path / "c-run").mkdir()
    (tmp_path / "c-run" / "record.json").write_text("{}")  # a run with no evaluation: no row
    rows = collect(tmp_path)
    assert len(rows) == 3
    grouped = tables(rows)
    assert list(grouped) == [("linf", 0.1), ("linf", 0.3)]
    assert [r.model for r in grouped[("linf", 0.3)]] == ["strided-wide", "strided"]
    text = markdown(rows)
    assert "## linf eps 0.3" in text and "| strided-wide | 99.00 | 91.60 | 0.00 | ok |" in text
    assert "| strided | 99.00 | 86.80 | - | FLAGGED |" in text and "| 200 |" in text


def test_command_writes_markdown_and_escaped_html_linked_to_records(tmp_path):
    _record(tmp_path, "x-run", "<script>alert(1)</script>", 0.3, 50.0)
    result = CliRunner().invoke(main, ["leaderboard", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 evaluation(s)" in result.output
    page = (tmp_path / "attacks" / "leaderboard.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert 'href="../x-run/eval/robust.json"' in page
    assert (tmp_path / "attacks" / "leaderboard.md").read_text().startswith("# Robust accuracy leaderboard")


def test_an_empty_folder_says_what_to_do(tmp_path):
    result = CliRunner().invoke(main, ["leaderboard", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0 and "run `advmnist evaluate --robust` first" in result.output


def test_shipped_models_and_the_literature_are_added_on_request_and_marked(tmp_path):
    from advmnist.shipped import list_pretrained

    md = tmp_path / "board.md"
    result = CliRunner().invoke(main, ["leaderboard", "--out", str(tmp_path / "none"), "--no-runs", "--shipped",
                                       "--literature", "--md", str(md)])
    assert result.exit_code == 0, result.output
    text = md.read_text()
    for name in list_pretrained():
        assert f"| {name} (" in text and f"pretrained {name}" in text
    assert "| Madry et al. 2018 (MNIST challenge, PGD-40): reported | 98.53 | 88.50 |" in text
    assert "| Gowal et al. 2018 (IBP, large CNN): reported | 98.34 | - | 91.95 |" in text
    assert "AutoAttack, Croce & Hein 2020" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "reported" in line]
    assert len(rows) == 6
    assert not (tmp_path / "none").exists()  # --md writes only that file


def test_the_masking_cell_shows_what_restarts_recovered(tmp_path):
    path = _record(tmp_path, "d-run", "strided-wide", 0.3, 91.96)
    rec = json.loads(path.read_text())
    rec["checks"] = [{"check": "a score-based attack finds nothing the gradient attacks missed", "passed": True,
                      "counts": {"score_based_only": 71, "limit": 50, "recovered_by_restarts": 25, "square_only": 46}}]
    path.write_text(json.dumps(rec))
    text = markdown(collect(tmp_path))
    assert "| ok (score-based only: 71, 25 recovered by restarts, 46 left) |" in text
