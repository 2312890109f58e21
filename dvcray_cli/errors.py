"""The errors dvcray raises for people to read.

Core modules raise these; the CLI prints ``message`` and ``hint`` (no
traceback) and exits with ``exit_code`` (DESIGN.md, "Exit codes").
"""

from __future__ import annotations


class DvcrayError(Exception):
    """An error whose message is written for the person at the terminal."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ExperimentFailed(DvcrayError):
    """A stage returned non-zero; its logs are kept."""

    exit_code = 1


class UsageError(DvcrayError):
    """Bad option, bad ``-S``, unknown template, a repo not fit for the command."""

    exit_code = 2


class ClusterError(DvcrayError):
    """Cluster unreachable, version mismatch, job lost, node died."""

    exit_code = 3


class StoreError(DvcrayError):
    """Results could not be written to or read from the store."""

    exit_code = 4


class Interrupted(DvcrayError):
    """Ctrl-C or SIGTERM."""

    exit_code = 130

    @classmethod
    def following(cls, run_id: str, stopped: bool) -> Interrupted:
        """Ctrl-C while following run ``run_id``, which was stopped (``dvcray run``) or goes on (``dvcray logs``)."""
        if stopped:
            return cls(f"Interrupted: run {run_id} was stopped.",
                       f"Its log and what it produced are in the store: dvcray logs {run_id}")
        return cls(f"Stopped following run {run_id}; the run itself goes on.",
                   f"Follow it again: dvcray logs {run_id} --follow")


class GitError(UsageError):
    """git refused: the repository is not in a state the command can use."""

    exit_code = 2
