"""``dvcray report``: params and metrics of experiments against their baseline.

Read through DVC's own ``experiments.show`` (what ``dvc exp show`` prints), so
the numbers are the ones DVC records; rendered as rows for a terminal table or
as Markdown for ``$GITHUB_STEP_SUMMARY`` or a pull-request comment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli.errors import UsageError


@dataclass
class Row:
    name: str
    rev: str
    values: dict[tuple[str, str], Any]  # (kind, "file:key" or "key") -> value
    error: str | None = None


@dataclass
class Report:
    baseline: Row
    experiments: list[Row]
    columns: list[tuple[str, str]] = field(default_factory=list)  # (kind, name), metrics first

    def changed(self, row: Row, column: tuple[str, str]) -> bool:
        return row.values.get(column) != self.baseline.values.get(column)

    def delta(self, row: Row, column: tuple[str, str]) -> float | None:
        new, old = row.values.get(column), self.baseline.values.get(column)
        if column[0] == "metric" and _number(new) and _number(old):
            return new - old
        return None

    def to_json(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            return {"name": r.name, "rev": r.rev, "error": r.error,
                    "metrics": {n: v for (k, n), v in r.values.items() if k == "metric"},
                    "params": {n: v for (k, n), v in r.values.items() if k == "param"}}

        return {"baseline": row(self.baseline), "experiments": [row(r) for r in self.experiments]}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flat(kind: str, files: dict[str, Any] | None, into: dict[tuple[str, str], Any], single: bool) -> None:
    for file, entry in (files or {}).items():
        stack = [("", (entry or {}).get("data") or {})]
        while stack:
            prefix, node = stack.pop()
            for key, value in node.items():
                name = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(value, dict):
                    stack.append((name, value))
                else:
                    into[(kind, name if single else f"{file}:{name}")] = value


def _row(state, name: str, single_params: bool, single_metrics: bool) -> Row:
    values: dict[tuple[str, str], Any] = {}
    data = state.data
    if data is not None:
        _flat("metric", data.metrics, values, single_metrics)
        _flat("param", data.params, values, single_params)
    return Row(name, state.rev[:7], values, str(state.error) if getattr(state, "error", None) else None)


def build(cwd: Path, names: list[str] | None = None) -> Report:
    """The report for experiments ``names`` (default: every experiment of HEAD).

    Raises:
        UsageError: not a DVC repo, or a named experiment that HEAD does not have.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(os.fspath(cwd))
    except NotDvcRepoError:
        raise UsageError(f"{cwd} is not in a DVC project.", "Run dvcray report inside your project.") from None
    try:
        states = repo.experiments.show(hide_workspace=True, hide_queued=True)
    finally:
        repo.close()
    if not states:
        raise UsageError("The repository has no commit yet, so no experiments.")
    base = states[0]
    exps = [(er.name or er.revs[0].name or er.revs[0].rev[:7], er.revs[0]) for er in (base.experiments or [])
            if er.revs]
    if names:
        known = {n for n, _ in exps}
        missing = [n for n in names if n not in known]
        if missing:
            raise UsageError(f"No experiment {', '.join(missing)} on this baseline ({base.rev[:7]}).",
                             "See them with: dvc exp show")
        exps = [(n, s) for n, s in exps if n in names]
    param_files = {f for _, s in [("", base), *exps] if s.data for f in (s.data.params or {})}
    metric_files = {f for _, s in [("", base), *exps] if s.data for f in (s.data.metrics or {})}
    single_p, single_m = len(param_files) <= 1, len(metric_files) <= 1
    baseline = _row(base, base.name or base.rev[:7], single_p, single_m)
    rows = [_row(s, n, single_p, single_m) for n, s in exps]
    _short_names([baseline, *rows])
    report = Report(baseline, rows)
    seen: dict[tuple[str, str], None] = {}
    for row in [baseline, *rows]:
        for column in row.values:
            seen.setdefault(column, None)
    # Every metric; of the params only those some experiment changed (as
    # dvc exp show --only-changed), or a wide project's table is unreadable.
    report.columns = [c for c in sorted(seen, key=lambda c: (c[0] != "metric", c[1]))
                      if c[0] == "metric" or any(report.changed(r, c) for r in rows)]
    return report


def _short_names(rows: list[Row]) -> None:
    """``file:key`` becomes ``key`` wherever no other file has that key."""
    owners: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        for kind, name in row.values:
            file, _, key = name.rpartition(":")
            owners.setdefault((kind, key), set()).add(file)
    for row in rows:
        renamed = {}
        for (kind, name), value in row.values.items():
            file, _, key = name.rpartition(":")
            renamed[(kind, key if len(owners[(kind, key)]) == 1 else name)] = value
        row.values = renamed


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_markdown(report: Report) -> str:
    """A GitHub-flavoured Markdown table; values that differ from the baseline are bold."""
    header = ["Experiment", *(f"{name}" for _, name in report.columns)]
    kinds = ["", *("metric" if k == "metric" else "param" for k, _ in report.columns)]
    lines = [f"### Experiments against {report.baseline.name} ({report.baseline.rev})", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
             "| " + " | ".join(f"_{k}_" if k else "" for k in kinds) + " |"]

    def cells(row: Row, is_base: bool) -> list[str]:
        out = []
        for column in report.columns:
            text = cell(row.values.get(column)).replace("|", "\\|")
            if not is_base and report.changed(row, column):
                delta = report.delta(row, column)
                text = f"**{text}**" + (f" ({delta:+.4g})" if delta is not None else "")
            out.append(text)
        return out

    lines.append("| " + " | ".join([f"{report.baseline.name} (baseline)", *cells(report.baseline, True)]) + " |")
    for row in report.experiments:
        lines.append("| " + " | ".join([row.name, *cells(row, False)]) + " |")
    lines += ["", "Bold: differs from the baseline; metric changes in brackets."]
    return "\n".join(lines) + "\n"
