"""Runs as processes of the cluster's runner service (``dvcray_cli.service``): snapshots
sent to it, its experiments followed with one long poll for all, stopped through it.

``service_reach.py`` finds the service or starts it; this module runs experiments there.
"""

from __future__ import annotations

import codecs
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dvcray_cli import clusters, ray_api
from dvcray_cli.errors import ClusterError, Interrupted
from dvcray_cli.runs import snapshot
from dvcray_cli.runs.backends import service_reach
from dvcray_cli.runs.backends.base import Emit, Followed, LogGone, RunInfo, Say, lost_contact
from dvcray_cli.runs.logtee import made_in_log
from dvcray_cli.runs.model import ExpSpec, Manifest, RunState
from dvcray_cli.service.client import MissingCommits, Service, ServiceError
from dvcray_cli.service.protocol import PollRequest, ServiceRun, placement_text

if TYPE_CHECKING:  # pragma: no cover
    from dvcray_cli.runs.submit import Prepared
    from dvcray_cli.store import Store

POLL_WAIT_S = 5.0
# How often a client following a local cluster's service checks that the cluster lives.
CHECK_EVERY_S = 5.0


def info_of(run: ServiceRun) -> RunInfo:
    """A run as the service reports it, as a RunInfo: LOST once it ended because its node died."""
    state = RunState.LOST if run.state.is_terminal() and run.lost else run.state
    return RunInfo(run.run_id, state, run.started, run.ended, run.node, run.lost, tuple(run.attempts))


class Watch:
    """Runs of one service followed with one long poll for all: their state changes, and
    the new bytes of the logs of those that go (resumed from their offsets after a
    dropped connection: nothing lost, nothing repeated)."""

    def __init__(self, service: Service, address: str, run_ids: list[str]) -> None:
        self.service, self.address = service, address
        self.after = 0
        self.offsets = {r: 0 for r in run_ids}
        self.states: dict[str, ServiceRun] = {}
        self.decoders = {r: codecs.getincrementaldecoder("utf-8")(errors="replace") for r in run_ids}
        self.lost_since: float | None = None
        self.checked = time.monotonic()
        self.cut: list[str] = []  # runs whose logs the last answer left for the next (it was full)

    def poll(self, watch: list[str], logs: list[str],
             wait: float = POLL_WAIT_S) -> tuple[dict[str, ServiceRun], dict[str, str], list[str]]:
        """``(changed runs, new log text per run, runs the service does not know)``;
        empty while the service does not answer (until ``lost_contact`` gives up).

        Raises:
            ClusterError: the service has not answered for too long, or its cluster died.
        """
        if time.monotonic() - self.checked > CHECK_EVERY_S:
            # The service may outlive its cluster a while (a head whose GCS died): look.
            self.checked = time.monotonic()
            dead = clusters.dead_cluster_name(self.address)
            if dead is not None:
                raise lost_contact(self.address, watch, ClusterError("its GCS process is gone"), 0.0)
        request = PollRequest(self.after, watch, {r: self.offsets.get(r, 0) for r in logs}, wait)
        try:
            answer = self.service.poll(request, timeout=wait + 15)
        except ServiceError as exc:
            self.lost_since = self.lost_since or time.time()
            error = lost_contact(self.address, watch, exc, self.lost_since)
            if error is not None:
                raise error from None
            self.reconnect()
            time.sleep(1.0)
            return {}, {}, []
        self.lost_since = None
        self.after = answer.seq
        self.cut = answer.cut
        text: dict[str, str] = {}
        for run_id, (start, data) in answer.logs.items():
            if start != self.offsets.get(run_id, 0) or not data:
                continue
            self.offsets[run_id] = start + len(data)
            decoder = self.decoders.setdefault(run_id, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            text[run_id] = decoder.decode(data)
        self.states.update(answer.runs)
        return answer.runs, text, answer.unknown

    def reconnect(self) -> None:
        """Reopen the way to the service when it broke: the SSH port-forward to a launcher or
        AWS cluster's head dies with a laptop's sleep or a network change, and is not the
        run's loss (issue 19, item 5). The new forward is verified (its own ssh listens, the
        head's host key is the pinned one), and the service's answers are signed: nothing is
        lost, and the log goes on from where it was."""
        if not self.service.head_port:
            return
        try:
            url = clusters.service_url(self.address, self.service.head_port)
        except ClusterError:
            return  # not (yet): asked again at the next failure, until lost_contact gives up
        if url:
            self.service.url = url

    def state(self, run_id: str) -> RunState:
        found = self.states.get(run_id)
        return found.state if found is not None else RunState.PENDING


class ServiceBackend:
    """Each run a process of the cluster's runner service."""

    name = "service"
    retries_lost = True   # the service submits a placed run lost with its node again (service/retries.py)

    def __init__(self, address: str, service: Service, many: bool = False) -> None:
        """``many``: what the service says of runs is read once, for all (``dvcray runs``)."""
        self.address, self.service, self.many = address, service, many
        self._runs: dict[str, ServiceRun] | None = None

    @classmethod
    def reach(cls, address: str, say: Say) -> ServiceBackend | None:
        """The cluster's runner service, started if needed (``service_reach.reach``)."""
        service = service_reach.reach(address, say)
        return cls(address, service) if service is not None else None

    @classmethod
    def open(cls, address: str, many: bool = False) -> ServiceBackend | None:
        """The runner service this machine knows for ``address``; None when it does not answer."""
        service = service_reach.find(address)
        return cls(address, service, many) if service is not None else None

    @classmethod
    def locate(cls, address: str, run_id: str, job_id: str) -> tuple[ServiceBackend, RunInfo]:
        """The cluster's runner service and what it says of the run now.

        Raises:
            ClusterError: it does not answer, or does not know the run (the message says which).
        """
        backend = None if clusters.dead_cluster_name(address) is not None else cls.open(address)
        try:
            info = backend.info(run_id, job_id) if backend is not None else None
        except ClusterError:
            backend, info = None, None
        if backend is None or info is None:
            raise ClusterError(f"the runner service of the cluster at {address} "
                               f"{'does not know it' if backend else 'does not answer'}")
        return backend, info

    @staticmethod
    def keeps_log(run_id: str, job_id: str) -> bool:
        return True

    def recorded(self) -> dict[str, str]:
        return {"backend": self.name, "service": self.service.service_id}

    # ------------------------------------------------------------------ submit

    def one_submission(self, placed: bool) -> bool:
        return True  # the service places and paces a submission's experiments itself

    def cached_history(self, git_root: Path) -> tuple[str, list[str] | None]:
        # Only what the cluster's copy of the repository lacks travels (DESIGN.md,
        # "Snapshot"): ask it which of HEAD's ancestors it has.
        root, samples = snapshot.history(git_root)
        return root, self.service.have(root, samples)

    def package(self, prepared: Prepared, manifest: Manifest) -> Path:
        return prepared.snapshot_dir

    def submit(self, prepared: Prepared, folder: Path, job_id: str, specs: list[ExpSpec], placed: bool) -> None:
        """Hand the snapshot to the runner service; with the whole history when the cluster's
        copy of the repository lacks what the bundle was made against (wiped, rewritten)."""
        where = prepared.placement if placed and prepared.placement is not None and prepared.placement.placed else None
        shape = placement_text({"CPU": where.num_cpus, "GPU": where.num_gpus, **(where.resources or {})}) \
            if where else ""
        try:
            try:
                self.service.send(folder, shape)
            except MissingCommits:
                snapshot.write_bundle(prepared.project.git_root, folder / snapshot.BUNDLE, None)
                self.service.send(folder, shape)
        except (ServiceError, MissingCommits) as exc:
            raise ClusterError(f"Could not hand the run to dvcray's runner service on the cluster at "
                               f"{prepared.address}: {exc}", "Check the cluster: dvcray cluster status "
                               "(DVCRAY_SERVICE=0 runs it as a Ray Job instead)") from None

    # ------------------------------------------------------------------ follow

    def follow(self, run_id: str, emit: Emit, stop_on_interrupt: bool = True) -> RunState:
        watch = Watch(self.service, self.address, [run_id])
        try:
            ended = False
            while True:
                _, text, unknown = watch.poll([run_id], [run_id], wait=POLL_WAIT_S if not ended else 0)
                if text.get(run_id):
                    emit(text[run_id])
                if unknown:
                    return RunState.LOST  # the service forgot it
                if ended and not text and not watch.cut:
                    return watch.state(run_id)
                ended = watch.state(run_id).is_terminal()
        except KeyboardInterrupt:
            if stop_on_interrupt:
                self.stop({run_id: run_id})
            raise Interrupted.following(run_id, stopped=stop_on_interrupt) from None

    def follow_many(self, sweep: Followed) -> None:
        """One long poll for all: their state changes, and the new lines of those that go.
        The store is read only for an experiment the service says has ended (its result)."""
        by_id = {s.spec.run_id: s for s in sweep.states}
        watch = Watch(self.service, self.address, list(by_id))
        partial: dict[str, str] = {}
        draining: set[str] = set()  # ended, and their last lines maybe not read yet
        while True:
            open_ = [s for s in sweep.states if s.outcome is None]
            if not open_ and not draining:
                return
            logs = [s.spec.run_id for s in open_ if s.state == RunState.RUNNING] + sorted(draining)
            changed, text, unknown = watch.poll([s.spec.run_id for s in open_], logs,
                                                wait=0 if draining else POLL_WAIT_S)
            for run_id, chunk in text.items():
                lines = (partial.pop(run_id, "") + chunk).split("\n")
                partial[run_id] = lines.pop()
                for line in lines:
                    sweep.line(by_id[run_id].name, line)
            draining &= set(text) | set(watch.cut)
            moved = False
            for run_id, run in changed.items():
                state = by_id.get(run_id)
                if state is None or state.outcome is not None:
                    continue
                if run.state == RunState.RUNNING and state.state == RunState.PENDING:
                    sweep.running(state, run.started or time.time())
                    moved = True
                elif run.state.is_terminal():
                    draining.add(run_id)
                    sweep.collect(state, info_of(run))
                    moved = True
            for run_id in unknown:  # the service forgot it (it was restarted): the store says how it ended
                state = by_id.get(run_id)
                if state is not None and state.outcome is None:
                    sweep.collect(state, RunInfo(run_id, RunState.SUCCEEDED))
                    moved = True
            if moved:
                sweep.changed()

    # ------------------------------------------------------------------ after the fact

    def info(self, run_id: str, job_id: str) -> RunInfo | None:
        if self._runs is None or not self.many:
            self._runs = {}  # asked once when many: a service that does not answer now is not asked again
            self._runs = self.service.runs()
        run = self._runs.get(run_id)
        return info_of(run) if run is not None else None

    def made(self, run_id: str, job_id: str) -> tuple[str, str] | None:
        chunks: list[bytes] = []
        offset = 0
        try:
            while True:
                answer = self.service.poll(PollRequest(0, [run_id], {run_id: offset}, 0), timeout=30)
                start, data = answer.logs.get(run_id, (offset, b""))
                if start != offset or not data:
                    break
                chunks.append(data)
                offset += len(data)
        except ServiceError:
            return None
        return made_in_log(b"".join(chunks).decode(errors="replace"), run_id)

    def show_log(self, run_id: str, emit: Emit, follow: bool) -> RunState | None:
        info = self.info(run_id, run_id)
        if info is None:
            return None
        shown = False

        def counted(text: str) -> None:
            nonlocal shown
            shown = shown or bool(text)
            emit(text)

        said = self._show_log(run_id, counted, follow)
        if shown or not info.lost:
            return said
        # Its log was on the node that died: the store keeps the copy the runner uploaded.
        raise LogGone(f"Run {run_id} is lost ({info.lost})", lost=True)

    def _show_log(self, run_id: str, emit: Emit, follow: bool) -> RunState:
        if follow:
            return self.follow(run_id, emit, stop_on_interrupt=False)
        watch = Watch(self.service, self.address, [run_id])
        while True:
            _, text, unknown = watch.poll([run_id], [run_id], wait=0)
            if unknown:
                return RunState.LOST
            if not text.get(run_id):
                return watch.state(run_id)
            emit(text[run_id])

    def stop(self, runs: dict[str, str], timeout: float | None = None, say: Say | None = None) -> dict[str, RunState]:
        run_ids = list(runs)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for run_id in run_ids:
                try:
                    self.service.stop(run_id)
                except ServiceError:
                    continue
            deadline = time.monotonic() + (timeout if timeout is not None else ray_api.stop_grace_s() + 10)
            found: dict[str, RunState] = {}
            after = 0
            while time.monotonic() < deadline:
                try:
                    answer = self.service.poll(PollRequest(after, run_ids, wait=2), timeout=20)
                except ServiceError:
                    break
                after = answer.seq
                found.update({r: run.state for r, run in answer.runs.items()})
                found.update({r: RunState.LOST for r in answer.unknown})
                if all(found.get(r, RunState.PENDING).is_terminal() for r in run_ids):
                    break
            return found
        finally:
            signal.signal(signal.SIGINT, previous)

    def tidy(self, store: Store) -> None:
        pass  # the service forgets finished runs itself
