"""An experiment's reservation holds its stage's Ray work too (``--cpus-per-exp``/``--gpus-per-exp``).

The runner service reserves each placed experiment's resources with a placement group
of one bundle (``service/placed.py``) and runs the experiment on that bundle's node.
The stage's own ``ray.init()`` makes a new Ray job, whose tasks would ask Ray for
resources of their own, beside the reservation; with every CPU reserved they would
wait forever. So the stage's driver joins the reservation the way a Ray task inside a
placement group does: as if it ran in that group with ``placement_group_capture_child_tasks``
(Ray's own semantics: every task and actor it starts without a strategy of its own goes
into the group, and so do theirs). Ray lets another job schedule into a placement group
by its id; the driver is told it through the runtime-env hook (``runtime_env.py``).

Two Ray libraries make placement groups of their own, which Ray cannot nest:

- Tune: inside a reservation its trials come out of the reservation's budget, with Ray's
  own manager for that case (``FixedResourceManager``, "nested" Tune), so N CPUs run
  N one-CPU trials at a time.
- Train (v2): its worker group's placement group is a share of the reservation: the
  workers go into the reservation's bundle, and a worker group larger than the
  reservation fails at once, naming both.

Everything here acts only inside a run that has a reservation (``RESERVATION_VAR``), and
only on work that is inside it (the current placement group is the reservation's).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from typing import Any

RESERVATION_VAR = "DVCRAY_RESERVATION"        # the hex id of the experiment's placement group
SHAPE_VAR = "DVCRAY_RESERVATION_SHAPE"        # its bundle, JSON: {"CPU": 2.0, "GPU": 0.0}
SETUP_HOOK = "dvcray_cli.integrations.reservation.setup"
TUNE = "ray.tune.execution.tune_controller"
TRAIN = "ray.train.v2._internal.execution.worker_group.worker_group"


def reserved() -> str | None:
    """The reservation's placement group id (hex) in this run, or None."""
    value = os.environ.get(RESERVATION_VAR, "").strip()
    return value or None


def shape() -> dict[str, float]:
    """What the reservation holds (``{"CPU": N, "GPU": G}``)."""
    try:
        found = json.loads(os.environ.get(SHAPE_VAR) or "{}")
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, (int, float)) and not str(k).startswith("node:")}


def env_vars() -> dict[str, str]:
    """The variables the stage's workers need to know the reservation."""
    return {name: os.environ[name] for name in (RESERVATION_VAR, SHAPE_VAR) if os.environ.get(name)}


# --------------------------------------------------------------------------- the stage's driver


def in_driver() -> None:
    """Put the stage's driver inside the reservation (called by the runtime-env hook in
    ``ray.init()``, before the driver connects)."""
    if reserved() is None:
        return
    from ray._private import worker as ray_worker
    from ray._raylet import PlacementGroupID

    cls = ray_worker.Worker
    if getattr(cls, "_dvcray_reservation", None) is None:
        own_id, own_capture = cls.placement_group_id, cls.should_capture_child_tasks_in_placement_group

        def placement_group_id(self):
            held = getattr(cls, "_dvcray_reservation", None)
            return held if held is not None and self.mode == ray_worker.SCRIPT_MODE else own_id.fget(self)

        def should_capture(self):
            held = getattr(cls, "_dvcray_reservation", None)
            return True if held is not None and self.mode == ray_worker.SCRIPT_MODE else own_capture.fget(self)

        cls.placement_group_id = property(placement_group_id)
        cls.should_capture_child_tasks_in_placement_group = property(should_capture)
    cls._dvcray_reservation = PlacementGroupID.from_hex(reserved())
    _patch_libraries()


def setup() -> None:
    """``worker_process_setup_hook`` of the stage's job: in each of its worker processes
    (Train's controller makes its worker group there)."""
    if reserved() is not None:
        _patch_libraries()


def _inside() -> Any:
    """The reservation's placement group when the caller's work is inside it, else None."""
    import ray

    current = ray.util.get_current_placement_group()
    worker = ray._private.worker.global_worker
    if current is None or not worker.should_capture_child_tasks_in_placement_group:
        return None
    return current if current.id.hex() == reserved() else None


# --------------------------------------------------------------------------- Tune and Train


def _patch_libraries() -> None:
    from ray.util import scheduling_strategies

    strategy = scheduling_strategies.PlacementGroupSchedulingStrategy
    if not getattr(strategy, "_dvcray_shares", False):
        own_init = strategy.__init__

        def __init__(self, placement_group, placement_group_bundle_index=-1, placement_group_capture_child_tasks=None):
            if is_share(placement_group):
                # A share of the reservation: any of its bundles (it has one).
                placement_group, placement_group_bundle_index = placement_group.whole(), -1
            own_init(self, placement_group, placement_group_bundle_index, placement_group_capture_child_tasks)

        strategy.__init__ = __init__
        strategy._dvcray_shares = True
    when_imported(TUNE, _patch_tune)
    when_imported(TRAIN, _patch_train)


def _patch_tune(module) -> None:
    own = module.PlacementGroupResourceManager
    if getattr(own, "_dvcray", False):
        return

    def manager(*args, **kwargs):
        if _inside() is None:
            return own(*args, **kwargs)
        from ray.air.execution.resources.fixed import FixedResourceManager

        import ray

        # The driver's budget is the reservation; a task's, what Ray assigned to it.
        driver = ray._private.worker.global_worker.mode == ray._private.worker.SCRIPT_MODE
        return FixedResourceManager(total_resources=shape() if driver else None)

    manager._dvcray = True
    module.PlacementGroupResourceManager = manager


def _patch_train(module) -> None:
    cls = module.WorkerGroup
    own = cls._create_placement_group
    if getattr(own, "_dvcray", False):
        return

    def _create_placement_group(self, scaling_config, worker_group_context):
        if _inside() is None:
            return own(self, scaling_config, worker_group_context)
        per_worker = dict(worker_group_context.resources_per_worker)
        bundles = [dict(per_worker) for _ in range(worker_group_context.num_workers)]
        check_fits(bundles, shape(), "Ray Train's worker group")
        shared = share(bundles)
        try:
            from ray.train.v2._internal.execution.worker_group.placement_group_handle import PlacementGroupHandle
        except ImportError:  # older Ray: the worker group takes the placement group itself
            return shared
        return _ShareHandle.make(PlacementGroupHandle, shared)

    _create_placement_group._dvcray = True
    cls._create_placement_group = _create_placement_group


def check_fits(bundles: list[dict[str, float]], held: dict[str, float], what: str) -> None:
    """Raise when ``bundles`` together need more than the reservation ``held``: they could
    never all run at once inside it.

    Raises:
        RuntimeError: naming what was asked and what the experiment reserved.
    """
    need = {k: sum(float(b.get(k, 0)) for b in bundles) for k in ("CPU", "GPU")}
    short = [k for k in need if need[k] > held.get(k, 0.0) + 1e-9]
    if short:
        asked = ", ".join(f"{need[k]:g} {k}" for k in short)
        have = ", ".join(f"{held.get(k, 0.0):g} {k}" for k in short)
        raise RuntimeError(f"dvcray: {what} asks for {asked} at once, but the experiment reserved {have} "
                           "(--cpus-per-exp/--gpus-per-exp): reserve more, or ask for less.")


_SHARE: Any = None


def share(bundles: list[dict[str, float]]) -> Any:
    """A placement group a Ray library asked for inside the reservation: its own id (so
    removing it never removes the reservation), the bundles asked for, ready at once;
    scheduled into, it is the reservation (any of its bundles)."""
    global _SHARE
    if _SHARE is None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        class ReservationShare(PlacementGroup):
            def __init__(self, bundles: list[dict[str, float]]) -> None:
                super().__init__(PlacementGroupID.from_random(), bundle_cache=[dict(b) for b in bundles])

            def ready(self):
                import ray

                return ray.put(self)

            def wait(self, timeout_seconds: float = 30) -> bool:
                return True

            @staticmethod
            def whole() -> PlacementGroup:
                return PlacementGroup(PlacementGroupID.from_hex(reserved()))

            def __reduce__(self):
                return (share, (self.bundle_cache,))

        _SHARE = ReservationShare
    return _SHARE(bundles)


def is_share(group: Any) -> bool:
    return _SHARE is not None and isinstance(group, _SHARE)


class _ShareHandle:
    @staticmethod
    def make(base, share):
        """A Train placement-group handle of ``share``: nothing to wait for, nothing to remove."""

        class ShareHandle(base):
            @property
            def placement_group(self):
                return share

            def ready(self):
                return share.ready()

            def wait(self, timeout_seconds: float = 30) -> bool:
                return True

            def shutdown(self) -> None:
                pass

        return ShareHandle()


# --------------------------------------------------------------------------- patch a module when it loads


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is imported (a Ray library the stage
    may import after ``ray.init()``, or in a worker)."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the module is loading now
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        own_exec, patch = spec.loader.exec_module, self.patch

        def exec_module(module):
            own_exec(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def when_imported(name: str, patch) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, patch))
