"""How runs execute on a cluster: one interface (``base.Backend``), two implementations.

- ``job``: each run a Ray Job of its own (a sweep's experiments on the head share one).
- ``service``: each run a process of the cluster's runner service (``dvcray_cli.service``),
  found or started by ``service_reach``.

The backend is chosen once, at submission (``choose``), and named in each run's record
(``RunRecord.backend``); ``runs``, ``logs``, ``stop`` and ``pull`` get the same kind back
here (``kind``, ``Clusters``, ``locate``). Nothing outside this package asks which kind a
run went as.
"""

from __future__ import annotations

from typing import Iterable

from dvcray_cli import clusters
from dvcray_cli.errors import ClusterError
from dvcray_cli.runs.backends.base import Backend, Followed, LogGone, RunInfo, lost_contact
from dvcray_cli.runs.backends.job import JobBackend
from dvcray_cli.runs.backends.service import ServiceBackend
from dvcray_cli.runs.model import RunRecord

__all__ = ["Backend", "Clusters", "Followed", "LogGone", "RunInfo", "choose", "kind", "locate", "lost_contact"]

KINDS: dict[str, type] = {JobBackend.name: JobBackend, ServiceBackend.name: ServiceBackend}


def choose(address: str, say=lambda m: None) -> Backend:
    """How runs go to the cluster at ``address``: through its runner service (started if
    needed), or where there is none, as Ray Jobs of their own.

    Raises:
        ClusterError: the cluster does not answer, refuses the token, or its dvcray differs.
    """
    return ServiceBackend.reach(address, say) or JobBackend.connect(address)


def kind(record: RunRecord | None) -> type:
    """The kind of backend that ran a run, as its record says. A run known only from the
    store is looked for as a Ray Job (a cluster's service is never asked about it)."""
    return KINDS.get(record.backend, JobBackend) if record is not None else JobBackend


def candidates(record: RunRecord | None, address: str | None, fallbacks: Iterable[str] = ()) -> list[tuple[type, str]]:
    """Where a run may be known: ``(kind, address)`` of the cluster it went to, or where this
    clone never submitted it, of the clusters configured here (``fallbacks``)."""
    return [(kind(record), a) for a in ([address] if address else list(fallbacks))]


def locate(record: RunRecord | None, address: str | None, run_id: str, job_id: str,
           fallbacks: Iterable[str] = ()) -> tuple[Backend | None, RunInfo | None, list[str]]:
    """The backend that knows run ``run_id`` and what it says now; or None, None and why
    not, a reason per cluster asked (none: there was no cluster to ask)."""
    problems = []
    for found, where in candidates(record, address, fallbacks):
        try:
            backend, info = found.locate(where, run_id, job_id)
            return backend, info, problems
        except ClusterError as exc:
            problems.append(exc.message)
    return None, None, problems


class Clusters:
    """The backends of the clusters runs went to, each opened at most once; ``errors``:
    what went wrong reaching each address."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Backend | None] = {}
        self.errors: dict[str, str] = {}

    def backend(self, found: type, address: str) -> Backend | None:
        """The backend of kind ``found`` at ``address``; None where nothing answers."""
        key = (found.name, address)
        if key not in self._open:
            backend = None
            dead = clusters.dead_cluster_name(address)
            if dead is not None:
                # Its dashboard or service may linger and answer only after long GCS timeouts.
                self.errors[address] = f"the Ray cluster {dead!r} died (its GCS process is gone)"
            else:
                try:
                    backend = found.open(address, many=True)
                except ClusterError as exc:
                    self.errors[address] = exc.message
            self._open[key] = backend
        return self._open[key]

    def info(self, found: type, address: str, run_id: str, job_id: str) -> RunInfo | None:
        """What the cluster at ``address`` says of the run; None when it does not answer or
        does not know it."""
        backend = self.backend(found, address)
        if backend is None:
            return None
        try:
            return backend.info(run_id, job_id)
        except ClusterError as exc:
            self.errors[address] = exc.message
            return None
