"""What every way of executing a run offers (``Backend``), and what it says of a run (``RunInfo``).

Callers hold a ``Backend`` and never ask which one it is: only its implementation knows
whether a run is a Ray Job of its own (``job.py``) or a process of the cluster's runner
service (``service.py``), as DVC's executors and queues hide theirs
(``dvc/repo/experiments/executor/base.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from dvcray_cli import clusters
from dvcray_cli.errors import ClusterError
from dvcray_cli.runs.model import Attempt, ExpSpec, Manifest, RunState

if TYPE_CHECKING:  # pragma: no cover
    from dvcray_cli.runs.submit import Prepared
    from dvcray_cli.store import Store

Emit = Callable[[str], None]
Say = Callable[[str], None]

# How long the client keeps trying to reach a cluster that stopped answering.
RECONNECT_TIMEOUT_S = float(os.environ.get("DVCRAY_RECONNECT_TIMEOUT_S", "60"))


@dataclass(frozen=True)
class RunInfo:
    """What a cluster says of one run now."""

    run_id: str
    state: RunState              # LOST: it ended because its node died (``lost`` says how)
    started: float | None = None  # Unix time
    ended: float | None = None
    node: str = ""
    lost: str = ""               # why it is lost, when it is
    attempts: tuple[Attempt, ...] = ()  # its tries so far, where its cluster retries lost runs


class LogGone(Exception):
    """The cluster knows the run but cannot give its log (the node that held it is gone):
    the store's copy is the one to read. ``lost``: the run is lost, too."""

    def __init__(self, message: str, lost: bool = False) -> None:
        super().__init__(message)
        self.message, self.lost = message, lost


class Followed(Protocol):
    """Many experiments followed together (``runs.sweep.Sweep``), as a backend drives them."""

    states: list  # ExpState, in order
    jobs: dict    # {submission id: [ExpState]}

    def line(self, name: str, text: str) -> None:
        """A line of experiment ``name``'s own log."""

    def running(self, state, started: float | None = None) -> None:
        """``state`` started running (``started``: when, if the cluster says)."""

    def collect(self, state, info: RunInfo) -> bool:
        """Bring ``state`` home once its result is in the store (or record how it ended without
        one, when ``info`` says it has ended); True when it changed."""

    def changed(self) -> None:
        """States changed: show them, and submit what waits for room."""


class Backend(Protocol):
    """One way of executing runs on the cluster at ``address``."""

    name: str       # what a run's record keeps (``RunRecord.backend``), for ``backends.kind``
    address: str
    # Whether a run lost with its machine is tried again where it runs (``--retries``): the
    # runner service does; a Ray Job does not, and Ray leaves retries to the submitter.
    retries_lost: bool

    @staticmethod
    def keeps_log(run_id: str, job_id: str) -> bool:
        """Whether the cluster keeps this run's own log apart (a sweep's shared Ray Job does not)."""

    def recorded(self) -> dict[str, str]:
        """The fields of a run's record that name this backend."""

    def one_submission(self, placed: bool) -> bool:
        """Whether a sweep's experiments go in one submission (else one each, at most
        ``--jobs`` at once); ``placed``: with reserved resources (``--cpus-per-exp``)."""

    def cached_history(self, git_root: Path) -> tuple[str, list[str] | None]:
        """``(the project's first commit, commits of HEAD's history the cluster's copy has)``;
        ``("", None)`` where it keeps none and the bundle carries the whole history."""

    def package(self, prepared: Prepared, manifest: Manifest) -> Path:
        """The folder the snapshot travels from (its manifest is written there next)."""

    def submit(self, prepared: Prepared, folder: Path, job_id: str, specs: list[ExpSpec], placed: bool) -> None:
        """Hand the snapshot in ``folder`` over as submission ``job_id`` of ``specs`` (its manifest
        names them); ``placed``: with the resources of ``prepared.placement``.

        Raises:
            ClusterError: the cluster refused it.
        """

    def follow(self, run_id: str, emit: Emit, stop_on_interrupt: bool = True) -> RunState:
        """Stream the run's log until it ends; return how it ended. Ctrl-C stops the run
        (``Interrupted`` once it has ended), or with ``stop_on_interrupt=False`` only the following."""

    def follow_many(self, sweep: Followed) -> None:
        """Follow a sweep's experiments until every one is home."""

    def info(self, run_id: str, job_id: str) -> RunInfo | None:
        """What the cluster says of the run; None when it does not know it.

        Raises:
            ClusterError: the cluster does not answer.
        """

    def made(self, run_id: str, job_id: str) -> tuple[str, str] | None:
        """``(ref, commit)`` of the experiment the run saved, as the cluster says it over the
        channel it authenticates (the run's log: ``model.made_in_log``); None when the cluster
        cannot say (it forgot the run, or does not answer). Never from the store."""

    def show_log(self, run_id: str, emit: Emit, follow: bool) -> RunState | None:
        """Write the run's log as the cluster keeps it (with ``follow``: until it ends);
        its state then, or None when the cluster does not know it.

        Raises:
            LogGone: the cluster cannot give its log.
        """

    def stop(self, runs: dict[str, str], timeout: float | None = None, say: Say | None = None) -> dict[str, RunState]:
        """Stop ``runs`` (``{run_id: job_id}``) and wait until each has ended (their runners
        save their work first); their states then."""

    def tidy(self, store: Store) -> None:
        """Housekeeping once runs have come home (never the reason a run fails)."""


def lost_contact(address: str, run_ids: list[str], exc: BaseException, since: float) -> ClusterError | None:
    """The error to end on once the cluster stopped answering; None to keep trying.

    At once when ``address`` is a cluster dvcray started on this machine and its
    GCS is gone (it died: nothing will come back); otherwise after
    ``DVCRAY_RECONNECT_TIMEOUT_S`` (default 60) without an answer.
    """
    runs = ", ".join(run_ids)
    first = run_ids[0] if len(run_ids) == 1 else "RUN"
    where = f"Its log up to then is in the store: dvcray logs {first}; dvcray runs shows what became of it."
    dead = clusters.dead_cluster_name(address)
    if dead is not None:
        return ClusterError(f"The Ray cluster {dead!r} at {address} died during run {runs}: "
                            "its GCS process is gone, and the run with it.", where)
    if time.time() - since <= RECONNECT_TIMEOUT_S:
        return None
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    return ClusterError(f"Lost contact with the Ray cluster at {address} for {RECONNECT_TIMEOUT_S:.0f} s "
                        f"while following run {runs} ({reason}). If the cluster died, the run is lost.",
                        f"The run may still be going if the cluster comes back. {where}")
