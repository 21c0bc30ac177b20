"""Every number in a generated block of README.md and docs/ equals what its committed results file renders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_matches_its_results_file():
    report = _report()
    assert any(report.blocks(p.read_text()) for p in report.DOCUMENTS), "no generated block found"
    assert report.stale() == [], "run `python benchmarks/report.py` after changing a results file"


def test_a_hand_edited_number_is_caught(tmp_path):
    report = _report()
    readme = (REPO / "README.md").read_text()
    match = report.blocks(readme)[0]
    body = match.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    edited = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    doc = tmp_path / "edited.md"
    doc.write_text(match.group(1) + edited + match.group(4))
    assert report.stale([doc]) == [f"{doc}: {match.group('name')}"]
    doc.write_text(match.group(0))
    assert report.stale([doc]) == []


def test_a_block_without_a_renderer_is_an_error(tmp_path):
    report = _report()
    doc = tmp_path / "unknown.md"
    doc.write_text("<!-- generated: no-such-table -->\nold\n<!-- /generated -->\n")
    with pytest.raises(KeyError, match="no-such-table"):
        report.stale([doc])
