"""What every kind of cluster shares (as SkyPilot's ``sky/provision/common.py``): the
names of the built-ins, the results ``up``, ``down`` and ``status`` answer with,
durations, and the marks dvcray leaves on a cluster's processes and nodes.

Imports nothing but the standard library and ``errors``: any cluster module may
import it, and ``python -m dvcray_cli.clusters.idle`` finds nothing of its own loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from dvcray_cli.errors import UsageError

LOCAL = ("local", "local-multinode")
AWS = ("aws", "aws-gpu")
BUILT_INS = LOCAL + AWS
UP_HINT = "Use: dvcray cluster up local"
# The head's Ray label that says which dvcray runs there (read by ``version.check_version``).
VERSION_LABEL = "dvcray-version"
# The idle watcher's module: how it is started (``python -m``) and found again among processes.
IDLE_MARKER = "dvcray_cli.clusters.idle"

Say = Callable[[str], None]


def quiet(_message: str) -> None:
    """A ``Say`` that says nothing."""


def utc_now() -> str:
    """Now, ISO 8601 in UTC, to the second: how records write times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- results


@dataclass
class UpResult:
    """A cluster after ``up``."""

    name: str
    kind: str
    started: bool                  # False: it was already running
    dashboard_url: str
    started_at: str
    num_cpus: float | None = None
    autoscaling: bool = False
    idle_timeout_s: float | None = None  # the watcher armed now (None: none)
    head_ip: str = ""
    config_label: str = ""         # launcher clusters: the YAML's path, as typed
    workers: list[str] = field(default_factory=list)   # launcher clusters: workers that joined


@dataclass
class DownResult:
    """What ``down`` did."""

    name: str
    kind: str
    was_running: bool
    stopped_runs: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)        # local: processes stopped
    terminated: list[str] = field(default_factory=list)  # aws: instances terminated
    region: str = ""
    nodes: list[str] = field(default_factory=list)        # launcher (on-prem): machines Ray stopped on
    unreachable: list[str] = field(default_factory=list)  # launcher (on-prem): machines SSH did not reach
    provider: str = ""


@dataclass
class Status:
    """Every cluster dvcray knows of, as ``cluster status`` shows them."""

    local: list[dict[str, Any]]
    aws: list[dict[str, Any]]
    auto_downs: list[dict[str, Any]]   # local clusters their idle watcher took down
    launcher: list[dict[str, Any]] = field(default_factory=list)   # clusters from any other YAML

    def to_json(self) -> list[dict[str, Any]]:
        return self.local + self.aws + self.launcher


# --------------------------------------------------------------------------- durations

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int | None) -> float:
    """Seconds in ``text``: ``90s``, ``30m``, ``1h``, ``1h30m``, a bare number of
    seconds; ``0``, ``off`` or ``none`` turn the watcher off (0).

    Raises:
        UsageError: anything else.
    """
    if text is None:
        return 0.0
    if isinstance(text, (int, float)):
        if text < 0:
            raise UsageError(f"Invalid duration {text}: it cannot be negative.", "Use e.g. 30m, 90s, 1h.")
        return float(text)
    value = text.strip().lower().replace(" ", "")
    if value in ("0", "off", "none", "never", "no"):
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise UsageError(f"Invalid duration {text!r}.", "Use e.g. 30m, 90s, 1h or 1h30m (0 or off: never).")
    return float(sum(float(n) * _UNITS[u] for n, u in parts))


def format_duration(seconds: float) -> str:
    """``3600`` -> ``1h``, ``5400`` -> ``1h30m``, ``90`` -> ``1m30s``, ``0`` -> ``off``."""
    if seconds <= 0:
        return "off"
    seconds = int(round(seconds))
    out = ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out
