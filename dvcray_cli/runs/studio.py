"""DVC Studio, posted to from home with the user's own token.

A run on a cluster has no Studio token (secrets never travel), so DVC and DVCLive
post their live updates to the runner instead (``runs/live.py``); the client posts
them on to Studio through ``dvc-studio-client``, the library DVC and DVCLive use,
with the settings a local ``dvc exp run`` in the project would use: the token,
``DVC_STUDIO_URL`` and DVC's ``studio`` config, ``DVC_STUDIO_OFFLINE``. With no
token, or offline, nothing is sent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from dvcray_cli.runs.project import Project, open_repo

logger = logging.getLogger(__name__)

# A stand-in repo URL, to ask dvc-studio-client whether it would post at all (offline?
# a token?) before the real URL is looked up in git.
_ANY_REPO = "dvcray://probe"
POST_WAIT_S = 30.0
# How long a data post waits for its plots before it goes alone.
HOLD_S = 1.0
HELD_TOO_LONG = object()


def config(project: Project) -> dict[str, Any]:
    """DVC Studio's settings as a local ``dvc exp run`` in ``project`` would post with:
    ``{"token", "url", "repo_url"}``, or ``{}`` when it would post nothing."""
    from dvc.config import Config
    from dvc_studio_client.config import get_studio_config

    studio = dict(Config(dvc_dir=os.fspath(project.dvc_root / ".dvc")).get("studio") or {})
    if not get_studio_config(dvc_studio_config=studio, studio_repo_url=_ANY_REPO):
        return {}  # offline, or no token: nothing more to look up
    from dvc.utils.studio import get_repo_url

    repo = open_repo(project)
    try:
        repo_url = get_repo_url(repo)  # exp.git_remote, as DVC's own start post
    finally:
        repo.close()
    # Else the git remote of the repo around the cwd, as in a local run (dvc-studio-client, which
    # remembers the first one it found for the whole process: this project's, not an earlier one's).
    from dvc_studio_client.config import get_studio_repo_url

    get_studio_repo_url.cache_clear()
    cwd = os.getcwd()
    os.chdir(project.dvc_root)
    try:
        return get_studio_config(dvc_studio_config=studio, studio_repo_url=repo_url)
    finally:
        os.chdir(cwd)


def post(settings: dict[str, Any], event: dict[str, Any]) -> bool | None:
    """Post one event (a body DVC or DVCLive sent on the cluster) as its sender would have."""
    from dvc_studio_client.post_live_metrics import post_live_metrics

    return post_live_metrics(
        event["type"], event["baseline_sha"], event["name"], event["client"],
        experiment_rev=event.get("experiment_rev"), machine=event.get("machine"),
        message=event.get("message"), metrics=event.get("metrics"), params=event.get("params"),
        plots=event.get("plots"), step=event.get("step"), subdir=event.get("subdir"),
        studio_token=settings["token"], studio_url=settings["url"], studio_repo_url=settings["repo_url"])


def _completes(head: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether ``event`` is the plots of ``head``: dvc-studio-client sends a data post
    with plots as two (metrics and params, then plots); posted again, they are one."""
    return (event["type"] == "data" and "plots" in event and "metrics" not in event and "params" not in event
            and all(event.get(k) == head.get(k) for k in ("baseline_sha", "name", "step")))


class Poster:
    """Posts events to DVC Studio in order, from a thread of its own (as DVCLive does),
    so a slow Studio never holds up the run's display. An experiment whose ``start``
    Studio refused gets no more posts (as DVCLive does)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.queue: queue.Queue = queue.Queue()
        self.refused: set[tuple[str, str]] = set()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def put(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.queue.put(event)

    def _loop(self) -> None:
        held = None  # a data post whose plots may follow in a post of their own
        while True:
            try:
                event = self.queue.get(timeout=HOLD_S)
            except queue.Empty:
                event = HELD_TOO_LONG
            if held is not None:
                if isinstance(event, dict) and _completes(held, event):
                    event = {**held, "plots": event["plots"]}
                else:
                    self._send(held)
                held = None
            if event is None:
                return
            if event is HELD_TOO_LONG:
                continue
            if event["type"] == "data" and "plots" not in event:
                held = event
            else:
                self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        key = (event["baseline_sha"], event["name"])
        if key in self.refused:
            return
        try:
            ok = post(self.settings, event)
        except Exception as exc:  # noqa: BLE001 - Studio is a display: never fail the run
            logger.warning("Failed to post to DVC Studio: %s", exc)
            ok = False
        if not ok and event["type"] == "start":
            self.refused.add(key)

    def close(self, wait_s: float = POST_WAIT_S) -> None:
        """Send what is queued (at most ``wait_s`` more), then stop."""
        self.queue.put(None)
        self.thread.join(timeout=wait_s)
