"""DVCLive and DVC's environment for stages that use Ray Tune or Ray Train.

What a stage script imports to log Ray's results with DVCLive correctly on any
cluster (DESIGN.md, "Ray and DVCLive")::

    from dvcray_cli.integrations.dvclive import (
        DVCLiveTrainCallback, DVCLiveTuneCallback, dvc_runtime_env)

    ray.init(runtime_env=dvc_runtime_env())        # workers see DVC_EXP_NAME, ...
    tune.RunConfig(callbacks=[DVCLiveTuneCallback("dvclive/tune", step_metric="epoch")])
    ray.train.RunConfig(callbacks=[DVCLiveTrainCallback("dvclive/train", step_metric="epoch")])

The callbacks log what workers report (``tune.report``, ``ray.train.report``)
from one process on the driver's node, one DVCLive step per report, as the
reports arrive: never from a worker, whose disk may be another machine's. Ray
Tune runs callbacks in the driver; Ray Train (V2) runs them in its controller
actor, on the driver's node but with cwd ``/`` (or a copy of the working_dir)
and none of DVC's variables. So a callback takes the stage's folder and DVC's
variables with it when it is made, and uses them wherever it runs. Secrets
(``DVC_STUDIO_TOKEN``, ``AWS_*``, anything named like a token, key or
password) never travel: Ray keeps runtime envs and pickled callbacks where
its dashboard and other nodes can read them. DVCLive's live updates to DVC
Studio therefore come only from Tune's callback (the driver has the token);
Train's controller has none.

DVCLive runs as inside a pipeline: no ``save_dvc_exp``, and by default no
dvc.yaml of its own (``dvcyaml=None``): declare the folder as a stage output
(``cache: false``) and its metrics.json and plots in the project's dvc.yaml.

A Ray Train run that resumes from its checkpoints (a retry of a dvcray run lost with its
machine: ``integrations.storage.run_name``) starts in a fresh workspace, where the DVCLive
folder of the lost attempt is not. ``DVCLiveTrainCallback(keep=...)`` keeps a copy of the
folder beside the run's checkpoints as it logs, and a resumed run starts from that copy
(DVCLive's ``resume=True``, the steps it logs again replacing the copy's), so the
experiment's metrics and plots show one run, not two.

Ray and DVCLive are imported only when a callback is first used, so importing
this module (and ``dvcray_cli``) stays light.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from dvclive import Live

__all__ = ["DVCLiveTrainCallback", "DVCLiveTuneCallback", "dvc_env_vars", "dvc_runtime_env"]  # noqa: F822

# Variables DVC and DVCLive read: DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV,
# DVC_STAGE, DVC_STUDIO_OFFLINE, DVCLIVE_LOGLEVEL, ...
_PREFIXES = ("DVC_", "DVCLIVE_")
# A variable whose name has one of these words is a secret, whatever its value.
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "KEY", "CREDENTIAL", "AUTH",
                 "SESSION", "COOKIE", "PRIVATE", "CERT")
# user:password@ (or token@) in a URL, e.g. a DVC_STUDIO_REPO_URL with a token in it.
_URL_USERINFO = re.compile(r"://[^/@\s]+@")

# Tune adds these to every result; they are not the trial's own metrics.
_TUNE_AUTO_KEYS = frozenset({
    "training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname",
    "pid", "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "config", "checkpoint_dir_name", "trial_id", "experiment_tag",
    "done", "should_checkpoint", "experiment_id", "warmup_time",
})

# The process's cwd and environment are shared by its threads: Live is opened under this lock.
_OPEN_LOCK = threading.Lock()


def is_secret(name: str, value: str = "") -> bool:
    """Whether an environment variable must never leave this process (AWS_*, *TOKEN*, ...)."""
    upper = name.upper()
    return (upper.startswith("AWS_") or any(word in upper for word in _SECRET_WORDS)
            or bool(_URL_USERINFO.search(value)))


def dvc_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """DVC's and DVCLive's variables of this process, without secrets.

    ``dvc exp run`` gives a stage DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV,
    DVC_STAGE and DVC Studio's settings; DVC_STUDIO_TOKEN and anything else that
    looks like a credential (see ``is_secret``) is left out.

    Args:
        environ: where to read them; ``os.environ`` by default.

    Returns:
        ``{name: value}``, empty outside a DVC pipeline.
    """
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items()
            if name.startswith(_PREFIXES) and not is_secret(name, value)}


def dvc_runtime_env(runtime_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Ray runtime env that gives workers DVC's variables (``dvc_env_vars``).

    Use it as ``ray.init(runtime_env=dvc_runtime_env())``. Given a runtime env
    of your own, its ``env_vars`` win over DVC's. Under ``dvcray run`` a plain
    ``ray.init()`` does this already (``dvcray_cli.integrations.runtime_env``).

    Args:
        runtime_env: a runtime env to extend (not changed).

    Returns:
        A new runtime env dict.
    """
    env = dict(runtime_env or {})
    env["env_vars"] = {**dvc_env_vars(), **(env.get("env_vars") or {})}
    return env


def _numbers(metrics: Mapping[str, Any], names: Iterable[str] | None, skip: Iterable[str]) -> dict[str, float]:
    """The scalar metrics to log: ``names`` if given, else every number not in ``skip``."""
    skip = set(skip)
    keys = list(names) if names is not None else [k for k in metrics if k not in skip]
    out = {}
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[key] = value
    return out


class _LiveFolder:
    """One DVCLive folder, opened on first use in whatever process logs to it.

    Pickles (Ray sends callbacks to Train's controller) as its settings only:
    the folder's absolute path, the cwd to open DVC from, and DVC's variables.
    """

    def __init__(self, path: str, cwd: str, env: dict[str, str], live_options: dict[str, Any],
                 resumed: bool = False) -> None:
        self.path = path
        self.cwd = cwd
        self.env = env
        self.live_options = live_options
        self.resumed = resumed   # holds a copy of an earlier attempt's steps: logged ones replace them
        self._live: Live | None = None
        self._missing = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_live"] = None
        return state

    @contextlib.contextmanager
    def _as_in_the_stage(self) -> Iterator[None]:
        """The stage's cwd and DVC's variables, while DVCLive reads them (it does so when opened).

        DVCLive finds the DVC repo from the cwd and knows it runs inside ``dvc exp
        run`` from DVC_ROOT and DVC_EXP_BASELINE_REV; in Train's controller the
        cwd is ``/`` (or a copy of Ray's working_dir, with a .dvc folder that is not
        the project's) and those variables are unset. Variables already set win
        (the driver's own environment, Studio's token included, stays as it is).
        """
        with _OPEN_LOCK:
            saved_cwd = os.getcwd()
            added = [name for name in self.env if name not in os.environ]
            try:
                for name in added:
                    os.environ[name] = self.env[name]
                if saved_cwd != self.cwd:
                    os.chdir(self.cwd)
                yield
            finally:
                if os.getcwd() != saved_cwd:
                    os.chdir(saved_cwd)
                for name in added:
                    os.environ.pop(name, None)

    def live(self) -> Live | None:
        if self._live is None and not self._missing:
            if not os.path.isdir(self.cwd):
                # Not the stage's machine (e.g. Train run inside a Tune trial on another node).
                import warnings

                warnings.warn(f"dvcray: {self.cwd} is not on this node; DVCLive logs nothing to "
                              f"{self.path} here.", stacklevel=3)
                self._missing = True
                return None
            from dvclive import Live

            options = {"dvcyaml": None, "report": None, **self.live_options, "save_dvc_exp": False}
            with self._as_in_the_stage():
                self._live = Live(self.path, **options)
        return self._live

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write one step: DVCLive appends a row to each plots/metrics/NAME.tsv and rewrites metrics.json."""
        if self.resumed and self._live is None:
            _drop_steps_from(self.path, step)
        live = self.live()
        if live is None:
            return
        live.step = step
        for name, value in metrics.items():
            live.log_metric(name, value)
        with self._as_in_the_stage():   # DVCLive looks for the DVC root again at each step
            live.next_step()

    def end(self) -> None:
        if self._live is not None:
            with self._as_in_the_stage():
                self._live.end()
            self._live = None


def _restore_copy(keep: str, folder: str) -> bool:
    """Bring the copy of a DVCLive folder kept at ``keep`` (a URI or folder of Ray's storage)
    into ``folder`` when that holds nothing yet; whether it did."""
    import pyarrow.fs as pafs

    if os.path.isdir(folder) and os.listdir(folder):
        return False
    fs, root = pafs.FileSystem.from_uri(keep)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return False
    os.makedirs(folder, exist_ok=True)
    pafs.copy_files(root, folder, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def _keep_copy(folder: str, keep: str) -> None:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(keep)
    fs.create_dir(root)
    pafs.copy_files(folder, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _drop_steps_from(folder: str, step: int) -> None:
    """Rows of ``step`` and later out of a DVCLive folder's plots: a resumed run logs them again."""
    from pathlib import Path

    for tsv in Path(folder, "plots", "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines or "step" not in lines[0].rstrip("\n").split("\t"):
            continue
        column = lines[0].rstrip("\n").split("\t").index("step")
        kept = [row for row in lines[1:] if not _step_at_least(row, column, step)]
        tsv.write_text("".join(lines[:1] + kept))


def _step_at_least(row: str, column: int, step: int) -> bool:
    cells = row.rstrip("\n").split("\t")
    return len(cells) > column and cells[column].strip().isdigit() and int(cells[column]) >= step


def _settings(dir: str, workspace: str | None) -> tuple[str, str, dict[str, str]]:
    """(absolute folder, cwd, DVC's variables) as of now, in the stage's process."""
    cwd = os.path.abspath(workspace or os.getcwd())
    return os.path.join(cwd, dir), cwd, dvc_env_vars()


def _step(metrics: Mapping[str, Any], step_metric: str | None, default: int) -> int:
    if step_metric is not None and isinstance(metrics.get(step_metric), numbers.Real):
        return int(metrics[step_metric])
    return default


def _default_trial_folder(trial: Any) -> str:
    """``trial-2`` for Tune's trial id ``3f2a1_00002`` (whose prefix changes from run to run)."""
    suffix = str(trial.trial_id).rsplit("_", 1)[-1]
    return f"trial-{int(suffix)}" if suffix.isdigit() else f"trial-{trial.trial_id}"


def _make_tune_callback() -> type:
    from ray import tune

    class DVCLiveTuneCallback(tune.Callback):
        """Logs every Tune trial's results with DVCLive, live, from the driver.

        One DVCLive folder per trial, ``DIR/trial-N``, one step per
        ``tune.report``. Pass it in ``tune.RunConfig(callbacks=[...])``.

        Args:
            dir: the folder, relative to the stage's cwd (``dvclive/tune``).
            step_metric: a reported metric that is the step (e.g. ``"epoch"``); by
                default Tune's ``training_iteration`` (1, 2, ...).
            metrics: the reported metrics to log; by default every number the
                trial reported (not Tune's own keys such as ``time_total_s``).
            trial_folder: a trial's folder name, from the trial (default ``trial-N``).
            workspace: the folder ``dir`` is relative to; by default the cwd now.
            **live_options: passed to ``dvclive.Live`` (``dvcyaml``, ``report``, ...).
        """

        def __init__(self, dir: str = "dvclive/tune", *, step_metric: str | None = None,
                     metrics: Iterable[str] | None = None,
                     trial_folder: Callable[[Any], str] | None = None,
                     workspace: str | None = None, **live_options: Any) -> None:
            self.path, self.cwd, self.env = _settings(dir, workspace)
            self.step_metric = step_metric
            self.metrics = list(metrics) if metrics is not None else None
            self.trial_folder = trial_folder or _default_trial_folder
            self.live_options = live_options
            self._folders: dict[str, _LiveFolder] = {}

        def folder(self, trial: Any) -> _LiveFolder:
            if trial.trial_id not in self._folders:
                self._folders[trial.trial_id] = _LiveFolder(
                    os.path.join(self.path, self.trial_folder(trial)), self.cwd, self.env,
                    self.live_options)
            return self._folders[trial.trial_id]

        def log_result(self, trial: Any, result: Mapping[str, Any]) -> None:
            """Log one result of ``trial`` (called for each, as it arrives)."""
            skip = _TUNE_AUTO_KEYS | ({self.step_metric} if self.step_metric else set())
            step = _step(result, self.step_metric, int(result.get("training_iteration") or 0))
            self.folder(trial).log(_numbers(result, self.metrics, skip), step)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.log_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_experiment_end(self, trials, **info):
            for folder in self._folders.values():
                folder.end()

        def _end(self, trial: Any) -> None:
            folder = self._folders.get(trial.trial_id)
            if folder is not None:
                folder.end()

    return DVCLiveTuneCallback


def _make_train_callback() -> type:
    from ray.train import UserCallback

    class DVCLiveTrainCallback(UserCallback):
        """Logs a Ray Train run's reports with DVCLive, live, from Train's controller.

        One step per ``ray.train.report`` (after every worker reported), from
        the metrics of one worker (rank 0 by default). Pass it in
        ``ray.train.RunConfig(callbacks=[...])``.

        Args:
            dir: the folder, relative to the stage's cwd (``dvclive/train``).
            step_metric: a reported metric that is the step (e.g. ``"epoch"``); by
                default the report's number (1, 2, ...).
            metrics: the reported metrics to log; by default every number reported.
            rank: whose report to log.
            workspace: the folder ``dir`` is relative to; by default the cwd now.
            keep: where in Ray's storage to keep a copy of the folder as it logs (e.g.
                ``f"{storage_path}/{name}/dvclive"``), so that a run resumed from its checkpoints
                (a retry: ``integrations.storage.run_name``) continues the folder's steps.
            **live_options: passed to ``dvclive.Live`` (``dvcyaml``, ``report``, ...).
        """

        def __init__(self, dir: str = "dvclive/train", *, step_metric: str | None = None,
                     metrics: Iterable[str] | None = None, rank: int = 0,
                     workspace: str | None = None, keep: str | None = None, **live_options: Any) -> None:
            path, cwd, env = _settings(dir, workspace)
            self.keep = keep.rstrip("/") if keep else None
            resumed = bool(self.keep) and _restore_copy(self.keep, path)
            if resumed:
                live_options = {**live_options, "resume": True}
            self.live_folder = _LiveFolder(path, cwd, env, live_options, resumed)
            self.step_metric = step_metric
            self.metrics = list(metrics) if metrics is not None else None
            self.rank = rank
            self.reports = 0

        def after_report(self, run_context, metrics, checkpoint):
            self.reports += 1
            if len(metrics) <= self.rank:
                return
            reported = metrics[self.rank] or {}
            skip = {self.step_metric} if self.step_metric else set()
            self.live_folder.log(_numbers(reported, self.metrics, skip),
                                 _step(reported, self.step_metric, self.reports))
            if self.keep:
                try:
                    _keep_copy(self.live_folder.path, self.keep)
                except Exception as exc:  # noqa: BLE001 - a copy for a retry: never stops training
                    import warnings

                    warnings.warn(f"dvcray: could not keep a copy of {self.live_folder.path} at {self.keep}: {exc}",
                                  stacklevel=2)

    return DVCLiveTrainCallback


_FACTORIES = {"DVCLiveTuneCallback": _make_tune_callback, "DVCLiveTrainCallback": _make_train_callback}


def __getattr__(name: str) -> type:
    # The classes subclass Ray's callback types, so they are made when first asked
    # for: importing this module imports neither Ray Tune nor Ray Train. Made
    # once and kept in the module, so pickles find them by name.
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = factory()
    cls.__module__ = __name__
    cls.__qualname__ = name
    globals()[name] = cls
    return cls
