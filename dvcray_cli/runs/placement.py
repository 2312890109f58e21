"""Where runners go: ``--cpus-per-exp``/``--gpus-per-exp`` (DESIGN.md, "Clusters").

Without them a run's runner goes to the head (Ray pins a job's supervisor there
when it asks for no resources). With them, each experiment's runner is a Ray
Job that reserves those resources (``entrypoint_num_cpus``/``_gpus``): Ray
places it on any node with room, the autoscaler adds nodes for runners that
wait, and runners queue for CPUs when there is no room.

What the reservation covers: the runner and the processes of the stage it
runs (``dvc exp run`` runs the stage command as a child of the runner), for as
long as the experiment runs. Ray tasks and actors that the stage starts (Tune
trials, Train workers, ``@ray.remote`` functions) are other work in Ray's eyes:
they ask for their own resources and cannot use the runner's, which stay held
while the runner waits for them. So runners that held every CPU of the cluster
would wait forever for their stages' tasks. A sweep therefore starts at most as
many placed runners at once as leave one runner's worth of CPUs (and GPUs) free
for the stages' Ray work (``limit``); the others wait their turn.

Runners need the store: with a local folder as store, only the head (this
machine) can reach it, so runners stay on the head: reserved there when the
head has the room, else not reserved at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dvcray_cli.clusters import Shape
from dvcray_cli.errors import UsageError

# Ray's resource on the head node only (ray/_private/ray_constants.py: HEAD_NODE_RESOURCE_NAME).
HEAD_RESOURCE = "node:__internal_head__"


@dataclass
class Placement:
    """How each experiment's runner is submitted."""

    num_cpus: float | None = None         # entrypoint_num_cpus
    num_gpus: float | None = None         # entrypoint_num_gpus
    resources: dict[str, float] | None = None  # entrypoint_resources (the head pin)
    limit: int | None = None              # placed runners at once, at most (None: no limit)
    note: str | None = None               # one line for the user, when the request was changed
    capacity: dict[str, float] | None = None  # the resources the limit was computed from

    @property
    def placed(self) -> bool:
        return self.num_cpus is not None or self.num_gpus is not None

    def submit_options(self) -> dict[str, Any]:
        """Keyword arguments of ``JobSubmissionClient.submit_job``."""
        options: dict[str, Any] = {}
        if self.num_cpus is not None:
            options["entrypoint_num_cpus"] = self.num_cpus
        if self.num_gpus is not None:
            options["entrypoint_num_gpus"] = self.num_gpus
        if self.resources:
            options["entrypoint_resources"] = dict(self.resources)
        return options


def _total(nodes: list[dict[str, Any]], key: str) -> float:
    return sum(float(n["resources"].get(key, 0)) for n in nodes)


def capacity(shape: Shape) -> tuple[dict[str, float], bool]:
    """The CPUs and GPUs a cluster has, or can grow to.

    Returns:
        ``({"CPU": c, "GPU": g}, known)``: ``known`` when that is the most the
        cluster can ever have (a cluster dvcray started: a fixed head, or an
        autoscaling one whose config says its maximum); otherwise what is
        alive now (an autoscaler may add more).
    """
    if shape.most is not None:
        return {"CPU": float(shape.most.get("CPU", 0)), "GPU": float(shape.most.get("GPU", 0))}, True
    now = {"CPU": _total(shape.nodes, "CPU"), "GPU": _total(shape.nodes, "GPU")}
    return now, shape.recorded


def at_once(total: float, per_exp: float) -> int:
    """Placed runners at once so that one runner's worth stays free for the stages' Ray work.

    ``floor(total / per_exp) - 1``, at least 1: with fewer, one runner at a time
    (its stage's tasks then get whatever the runner leaves).
    """
    if per_exp <= 0:
        return 10 ** 6
    return max(1, math.floor(total / per_exp + 1e-9) - 1)


def decide(shape: Shape | None, cpus: float | None, gpus: float | None, store_is_local: bool,
           store_url: str, experiments: int = 1, jobs: int | None = None) -> Placement:
    """Decide how runners are submitted for ``--cpus-per-exp``/``--gpus-per-exp``.

    A pure function of what the cluster has (``clusters.shape``) and what was asked.

    Args:
        shape: the cluster's nodes and the most it can grow to (None: nothing
            was asked, so nothing was looked up).
        cpus, gpus: what the user asked each runner to reserve (None: nothing).
        store_is_local, store_url: the run's store (a local folder keeps runners on the head).
        experiments: how many experiments the run has (a note on the limit only when it bites).
        jobs: ``--jobs``. Where the cluster's most is unknown (it may autoscale
            beyond what is alive now), a ``--jobs`` of the user's replaces the limit.

    Raises:
        UsageError: a negative request, or more than a cluster dvcray knows can ever have.
    """
    if cpus is None and gpus is None:
        return Placement()
    for flag, value in (("--cpus-per-exp", cpus), ("--gpus-per-exp", gpus)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be 0 or more, not {value:g}.")
    shape = shape if shape is not None else Shape([])
    nodes = shape.nodes
    cap, known = capacity(shape)
    wanted = {"CPU": cpus or 0.0, "GPU": gpus or 0.0}
    if store_is_local:
        head = next((n for n in nodes if n["is_head"]), None)
        head_has = {k: float((head or {"resources": {}})["resources"].get(k, 0)) for k in wanted}
        others = len(nodes) > 1 or (known and cap != head_has)
        if all(head_has[k] >= wanted[k] for k in wanted):
            note = None
            if others:
                note = (f"The store {store_url} is a folder on this machine, which only the head reaches: "
                        "runners stay on the head and reserve their resources there (use an S3 store to "
                        "place them on any node).")
            placement = Placement(cpus, gpus, {HEAD_RESOURCE: 0.001}, _limit(head_has, cpus, gpus),
                                  note, head_has)
            return _note_limit(placement, experiments, wanted, "the head has")
        shortfall = ", ".join(f"{head_has[k]:g} {k}" for k in wanted if head_has[k] < wanted[k])
        return Placement(note=(f"The store {store_url} is a folder on this machine, which only the head reaches, "
                               f"and the head has {shortfall}: runners run on the head without a reservation "
                               "(use an S3 store to place them on any node)."))
    if known:
        short = [k for k in wanted if wanted[k] > cap[k]]
        if short:
            have = ", ".join(f"{cap[k]:g} {k}" for k in short)
            raise UsageError(f"Each runner would reserve more than this cluster can ever have ({have}).",
                             "Ask for less with --cpus-per-exp/--gpus-per-exp, or use a bigger cluster.")
    if not known and jobs:
        return Placement(cpus, gpus, None, None, None, cap)
    placement = Placement(cpus, gpus, None, _limit(cap, cpus, gpus), None, cap)
    if not known:
        placement = _note_limit(placement, experiments, wanted, "the cluster has now", "; pass --jobs to allow more")
        return placement
    return _note_limit(placement, experiments, wanted, "the cluster has at most")


def _note_limit(placement: Placement, experiments: int, wanted: dict[str, float], where: str,
                more: str = "") -> Placement:
    """Say so when the limit holds experiments back."""
    if placement.limit is None or placement.limit >= experiments:
        return placement
    cap = placement.capacity or {}
    shown = ", ".join(f"{cap.get(k, 0):g} {k}" for k in wanted if wanted[k])
    line = (f"At most {placement.limit} experiment(s) at once: each runner holds its reservation while its "
            f"stage's Ray tasks need resources of their own, and {where} {shown}{more}.")
    placement.note = f"{placement.note} {line}" if placement.note else line
    return placement


def _limit(cap: dict[str, float], cpus: float | None, gpus: float | None) -> int:
    limits = [at_once(cap["CPU"], cpus)] if cpus else []
    if gpus:
        limits.append(at_once(cap["GPU"], gpus))
    return min(limits) if limits else 10 ** 6
