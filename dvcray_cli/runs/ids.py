"""The names of runs and experiments, parsed and formatted here only.

- ``RunId``: ``dvcray-YYYYmmdd-HHMMSS-xxxxxx[-N]``.
- ``ExpRef``: ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`` (as DVC's ``ExpRefInfo``), and
  ``valid_exp_name``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

SHA = re.compile(r"[0-9a-f]{40}")
# git check-ref-format, for one component: no control characters, space, ~ ^ : ? * [ \.
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def valid_exp_name(name: str) -> bool:
    """``name`` makes a valid experiment ref (git's ``check-ref-format`` rules for
    one component, as DVC checks it): no ``/``, no control characters or ``~^:?*[\\``
    or spaces, no ``..`` or ``@{``, not ``@``, not starting with ``.`` or ending in
    ``.``/``.lock``."""
    return bool(name) and "/" not in name and not _BAD_CHARS.search(name) and ".." not in name \
        and "@{" not in name and name != "@" and not name.startswith(".") \
        and not name.endswith((".", ".lock"))


@dataclass(frozen=True)
class ExpRef:
    """An experiment's git ref, ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``.

    Never DVC's internal refs (``refs/exps/stash``, ``exec``, ``celery``, ...):
    those carry pickled run variables, a Studio token included.
    """

    baseline: str
    name: str

    def __str__(self) -> str:
        return f"refs/exps/{self.baseline[:2]}/{self.baseline[2:]}/{self.name}"

    @classmethod
    def parse(cls, ref: Any) -> ExpRef | None:
        """The ExpRef ``ref`` spells, or None when it is anything else."""
        if not isinstance(ref, str):
            return None
        parts = ref.split("/")
        if len(parts) != 5 or parts[:2] != ["refs", "exps"]:
            return None
        baseline = parts[2] + parts[3]
        if len(parts[2]) != 2 or not SHA.fullmatch(baseline) or not valid_exp_name(parts[4]):
            return None
        return cls(baseline, parts[4])




_RUN_ID = re.compile(r"dvcray-(\d{8}-\d{6})-([0-9a-f]+)(?:-(\d+))?")


@dataclass(frozen=True)
class RunId:
    """A run's id, ``dvcray-YYYYmmdd-HHMMSS-xxxxxx`` (its submission's UTC time, so ids sort
    by it, and a random part), with ``-N`` after it for the N-th experiment of a sweep or
    of ``queue start``: their shared submission has the id without it. Parsed and
    formatted here only (as ``ExpRef``)."""

    stamp: str      # YYYYmmdd-HHMMSS
    token: str
    index: int = 0  # 0: a run of its own, or a submission that several share

    def __str__(self) -> str:
        return f"dvcray-{self.stamp}-{self.token}" + (f"-{self.index}" if self.index else "")

    @classmethod
    def new(cls) -> RunId:
        """A fresh id, stamped now."""
        return cls(time.strftime("%Y%m%d-%H%M%S", time.gmtime()), secrets.token_hex(3))

    @classmethod
    def parse(cls, text: Any) -> RunId | None:
        """The RunId ``text`` spells, or None when it is anything else."""
        found = _RUN_ID.fullmatch(text) if isinstance(text, str) else None
        if found is None:
            return None
        return cls(found.group(1), found.group(2), int(found.group(3) or 0))

    def member(self, index: int) -> RunId:
        """The id of experiment ``index`` (from 1) of the submission with this id."""
        return dataclasses.replace(self, index=index)

    @property
    def submission(self) -> RunId:
        """The id of the submission it belongs to (itself, for a run of its own)."""
        return dataclasses.replace(self, index=0)

    @property
    def time(self) -> float | None:
        """When it was submitted (Unix time); None for a stamp that is no time."""
        from datetime import datetime, timezone

        try:
            return datetime.strptime(self.stamp, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return None
