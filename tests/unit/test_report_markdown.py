"""The report's Markdown, from a report built by hand (the real one: func/test_report.py)."""

from __future__ import annotations

from dvcray_cli.report import Report, Row, to_markdown


def test_markdown_marks_changes_and_escapes_pipes():
    base = Row("main", "abc1234", {("metric", "acc"): 0.5, ("param", "lr"): 0.1, ("param", "note"): "a|b"})
    faster = Row("faster", "def5678", {("metric", "acc"): 0.8, ("param", "lr"): 0.3, ("param", "note"): "a|b"})
    report = Report(base, [faster], [("metric", "acc"), ("param", "lr"), ("param", "note")])
    md = to_markdown(report)
    lines = md.splitlines()
    assert lines[0] == "### Experiments against main (abc1234)"
    assert "| Experiment | acc | lr | note |" in lines
    row = next(line for line in lines if line.startswith("| faster |"))
    assert "**0.8** (+0.3)" in row and "**0.3**" in row and "a\\|b" in row and "**a" not in row
    assert next(line for line in lines if line.startswith("| main (baseline) |")).count("**") == 0
    assert report.to_json()["experiments"][0]["metrics"] == {"acc": 0.8}
