"""Idle auto-down: a watcher that takes a whole cluster down, head included, after
a period with no dvcray run (DESIGN.md, "Clusters": Ray's autoscaler only ever
removes workers, never the head).

A run is a Ray job whose metadata has ``dvcray_version`` and whose status is
PENDING or RUNNING, read through the job API with the cluster's token.

- Local clusters (``dvcray cluster up local --idle-timeout 30m``): the watcher
  is a small process beside the head, in a session of its own (so it is never
  one of the cluster's processes), recorded in
  ``~/.dvcray/clusters/<name>.idle.json`` with its pid. When the time is up it
  calls ``local.down(name)``, which refuses if a run started meanwhile, and
  leaves ``<name>.idle-down.json`` behind so ``cluster status`` can say what happened.
- Clusters from Ray's launcher (any YAML, AWS included): ``head_start_ray_commands``
  start it on the head (``python -m dvcray_cli.clusters.idle launcher --config
  ~/ray_bootstrap_config.yaml --timeout N --background``; ``aws`` is the same). On a
  cloud it terminates every node of the cluster through Ray's node provider, the head
  last; on on-prem machines (provider ``local``) it stops Ray on every worker over
  SSH, then on the head (``take_down``). ``--down-now`` does that at once: ``dvcray
  cluster down`` runs it on an on-prem head.

Local and AWS code never import each other, nor this module: ``clusters``
arms and disarms watchers around their ``up`` and ``down``.

This module imports nothing heavy at the top: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import ray_api, files
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.common import IDLE_MARKER, format_duration, parse_duration, utc_now
from dvcray_cli.errors import DvcrayError, UsageError

DEFAULT_AWS_TIMEOUT_S = 3600.0


# --------------------------------------------------------------------------- the loop


def watch(is_busy: Callable[[], bool], take_down: Callable[[], bool], still_there: Callable[[], bool],
          timeout_s: float, poll_s: float, log: Callable[[str], None] = lambda _m: None,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> str:
    """Wait until the cluster has been idle for ``timeout_s``, then take it down.

    Args:
        is_busy: True while a dvcray run is pending or running. An exception
            (the job API does not answer) counts as busy: runs may well go on
            while the dashboard is down, and a cluster is never taken down on
            an answer it did not get.
        take_down: takes the cluster down; False when it refused (a run started
            in the meantime), and the wait starts over.
        still_there: False once the cluster is gone by other means (``down``).
        timeout_s: idle seconds before taking it down.
        poll_s: seconds between checks.
        log: where the loop says what it decided.
        clock, sleep: the time source and the wait between checks (a test gives a
            fake pair, so the loop's arithmetic is tested without waiting).

    Returns:
        ``"down"`` (this watcher took it down) or ``"gone"`` (someone else did).
    """
    idle_since = clock()
    while True:
        sleep(poll_s)
        if not still_there():
            log("cluster gone; watcher exits")
            return "gone"
        try:
            busy = is_busy()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log(f"job API does not answer ({type(exc).__name__}: {exc}); runs may go on: not idle")
            busy = True
        now = clock()
        if busy:
            idle_since = now
            continue
        if now - idle_since >= timeout_s:
            log(f"idle for {now - idle_since:.0f}s (timeout {timeout_s:.0f}s): taking the cluster down")
            if take_down():
                return "down"
            log("a run started meanwhile: not taken down")
            idle_since = clock()


# --------------------------------------------------------------------------- processes


def is_watcher(pid: int) -> bool:
    """``pid`` is a dvcray idle watcher (pids get recycled: never signal a stranger)."""
    return procs.is_ours(pid, IDLE_MARKER)


def _stop_watcher(pid: int) -> None:
    procs.stop_pid(pid, IDLE_MARKER)


def _spawn(args: list[str], log_path: Path) -> int:
    """Start ``python -m dvcray_cli.idle ARGS`` detached: its own session, no terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", IDLE_MARKER, *args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(Path.home()), close_fds=True)
    return proc.pid


# --------------------------------------------------------------------------- local clusters


def watcher_path(name: str) -> Path:
    return files.clusters_dir() / f"{name}.idle.json"


def note_path(name: str) -> Path:
    return files.clusters_dir() / f"{name}.idle-down.json"


def watcher(name: str) -> dict[str, Any] | None:
    """The running watcher of the local cluster ``name`` (``{"pid", "timeout_s", ...}``), or None."""
    record = files.read_json(watcher_path(name))
    if record and is_watcher(int(record.get("pid", 0))):
        return record
    return None


def arm(name: str, timeout_s: float, poll_s: float | None = None) -> dict[str, Any] | None:
    """Start the idle watcher of the running local cluster ``name``, replacing any
    previous one; ``timeout_s`` 0 only stops the previous one.

    Returns:
        The watcher's record, or None when off.
    """
    disarm(name)
    note_path(name).unlink(missing_ok=True)
    if timeout_s <= 0:
        return None
    from dvcray_cli.clusters import local

    current = local.recorded(name)
    if current is None:
        raise DvcrayError(f"Cluster {name!r} is not running: no idle watcher started.")
    poll = poll_s if poll_s is not None else _default_poll(timeout_s)
    args = ["local", "--name", name, "--timeout", f"{timeout_s:g}", "--poll", f"{poll:g}",
            "--session", str(current.session_id)]
    pid = _spawn(args, watcher_path(name).with_suffix(".log"))
    record = {"pid": pid, "timeout_s": timeout_s, "poll_s": poll, "started_at": utc_now(),
              "cluster_session": current.session_id}
    files.write_json(watcher_path(name), record)
    return record


def disarm(name: str) -> None:
    """Stop the idle watcher of the local cluster ``name``, if any (by its recorded pid)."""
    record = files.read_json(watcher_path(name))
    if record and record.get("pid") and int(record["pid"]) != os.getpid():
        _stop_watcher(int(record["pid"]))
    watcher_path(name).unlink(missing_ok=True)


def auto_downs() -> list[dict[str, Any]]:
    """Local clusters that their idle watcher took down: ``{"name", "at", "timeout_s"}``."""
    folder = files.clusters_dir()
    if not folder.is_dir():
        return []
    return [data for data in (files.read_json(p) for p in sorted(folder.glob("*.idle-down.json"))) if data]


def _default_poll(timeout_s: float) -> float:
    return max(1.0, min(30.0, timeout_s / 5))


def watch_local(name: str, timeout_s: float, poll_s: float, session: int | None = None) -> str:
    """The watcher's body for a local cluster (``python -m dvcray_cli.idle local``)."""
    from dvcray_cli.clusters import local

    def current() -> local.LocalCluster | None:
        found = local.recorded(name)
        if found is None or (session and found.session_id != session):
            return None
        return found

    def still_there() -> bool:
        return current() is not None

    def locate() -> tuple[str, str] | None:
        found = current()
        return (found.dashboard_url, found.token()) if found is not None else None

    is_busy = _busy_probe(locate)

    def take_down() -> bool:
        try:
            result = local.down(name, yes=False)
        except UsageError:  # a run started meanwhile
            return False
        if result.cluster is not None:
            files.write_json(note_path(name), {"name": name, "at": utc_now(), "timeout_s": timeout_s,
                                          "pids": len(result.pids)})
        return True

    outcome = watch(is_busy, take_down, still_there, timeout_s, poll_s, log=_log)
    record = files.read_json(watcher_path(name))
    if record and int(record.get("pid", 0)) == os.getpid():
        watcher_path(name).unlink(missing_ok=True)
    return outcome


def _busy_probe(locate: Callable[[], tuple[str, str] | None], launching: bool = False) -> Callable[[], bool]:
    """Whether dvcray runs are active on the cluster ``locate`` gives as (job API,
    token), None when it is gone; with ``launching``, also while its autoscaler is
    setting nodes up (taking a cluster down under a node's setup would leave that
    node's Ray running). One client, made again after an error."""
    client = None

    def is_busy() -> bool:
        nonlocal client
        found = locate()
        if found is None:
            return False
        if client is None:
            client = ray_api.client(found[0], found[1])
        try:
            if ray_api.active_runs(client):
                return True
            if launching:
                alive = [n for n in ray_api.list_nodes(found[0], found[1]) if n["alive"]]
                return bool((ray_api.autoscaler_status(found[0], found[1], alive=alive) or {}).get("pending"))
            return False
        except Exception:
            client = None
            raise

    return is_busy


# --------------------------------------------------------------------------- launcher clusters (on the head)


HEAD_JOB_API = "http://127.0.0.1:8265"


def take_down(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Take the whole cluster described by the head's bootstrap config down, head last.

    On-prem machines (provider ``local``) keep running: Ray stops on each of them.
    Clouds: Ray's node provider terminates every node (AWS through dvcray's AWS code,
    which turns AWS errors into messages).

    Returns:
        ``(done, unreachable)``: nodes taken down, and on-prem machines SSH did not reach.
    """
    from dvcray_cli.clusters.launcher import provider as launcher_provider

    kind = str(config["provider"].get("type", "")).lower()
    if kind == "local":
        stopped, unreachable = launcher_provider.stop_machines_from_head(config)
        return [*stopped, str(config["provider"].get("head_ip", "head"))], unreachable
    if kind == "aws":
        from dvcray_cli.clusters.aws.account import terminate_cluster

        return terminate_cluster(config["provider"], config["cluster_name"]), []
    return launcher_provider.terminate_cluster(config["provider"], config["cluster_name"]), []


def watch_launcher(config_path: Path, timeout_s: float, poll_s: float, job_api: str = HEAD_JOB_API) -> str:
    """The watcher's body on a launcher cluster's head: take the cluster down after ``timeout_s`` idle."""
    import yaml

    config = yaml.safe_load(Path(config_path).expanduser().read_text())
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(files.home() / "auth_token")
    token = ray_api.read_token(token_path) or ""

    is_busy = _busy_probe(lambda: (job_api, token), launching=True)

    def down() -> bool:
        try:
            if is_busy():
                return False
        except Exception:  # noqa: BLE001 - no answer is no proof of idleness (see watch)
            return False
        done, unreachable = take_down(config)
        what = "stopped Ray on {} machine(s)" if config["provider"].get("type") == "local" \
            else "terminated {} instance(s)"
        _log(what.format(len(done)) + f": {', '.join(done)}"
             + (f"; unreachable: {', '.join(unreachable)}" if unreachable else ""))
        return True

    return watch(is_busy, down, lambda: True, timeout_s, poll_s, log=_log)


# The name of the head's watcher before it served every provider.
watch_aws = watch_launcher


def _log(message: str) -> None:
    sys.stdout.write(f"{utc_now()} {message}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {IDLE_MARKER}", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    local = sub.add_parser("local", help="watch a local cluster recorded in ~/.dvcray/clusters")
    local.add_argument("--name", required=True)
    local.add_argument("--timeout", required=True)
    local.add_argument("--poll", type=float)
    local.add_argument("--session", type=int)
    for name in ("launcher", "aws"):  # aws: the name in configs written before every provider had one
        remote = sub.add_parser(name, help="watch the launcher cluster this head belongs to")
        remote.add_argument("--config", default="~/ray_bootstrap_config.yaml")
        remote.add_argument("--timeout", default=str(DEFAULT_AWS_TIMEOUT_S))
        remote.add_argument("--poll", type=float)
        remote.add_argument("--background", action="store_true",
                            help="start detached (replacing a previous watcher) and return at once")
        remote.add_argument("--down-now", action="store_true",
                            help="stop the watcher and take the whole cluster down now (dvcray cluster down)")
    args = parser.parse_args(argv)
    try:
        timeout_s = 0.0 if getattr(args, "down_now", False) else parse_duration(args.timeout)
    except UsageError as exc:
        parser.error(exc.message)
    poll = args.poll if args.poll else _default_poll(timeout_s)
    if args.kind == "local":
        if timeout_s <= 0:
            return 0
        watch_local(args.name, timeout_s, poll, args.session)
        return 0
    pidfile = files.home() / "idle.json"
    if args.down_now:
        previous = files.read_json(pidfile)
        if previous and previous.get("pid"):
            _stop_watcher(int(previous["pid"]))
        pidfile.unlink(missing_ok=True)
        import yaml

        done, unreachable = take_down(yaml.safe_load(Path(args.config).expanduser().read_text()))
        print(f"dvcray-down={','.join(done)}")
        print(f"dvcray-unreachable={','.join(unreachable)}")
        return 0
    if args.background:
        previous = files.read_json(pidfile)
        if previous and previous.get("pid"):
            _stop_watcher(int(previous["pid"]))
        pidfile.unlink(missing_ok=True)
        if timeout_s <= 0:
            print("dvcray idle watcher: off")
            return 0
        pid = _spawn(["launcher", "--config", args.config, "--timeout", f"{timeout_s:g}", "--poll", f"{poll:g}"],
                     files.home() / "idle.log")
        files.write_json(pidfile, {"pid": pid, "timeout_s": timeout_s, "started_at": utc_now()})
        print(f"dvcray idle watcher started (pid {pid}, timeout {format_duration(timeout_s)})")
        return 0
    if timeout_s <= 0:
        return 0
    watch_launcher(Path(args.config), timeout_s, poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
