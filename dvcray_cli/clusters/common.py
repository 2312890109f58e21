"""What every kind of cluster shares (as SkyPilot's ``sky/provision/common.py``): the
names of the built-ins, durations, and the marks dvcray leaves on a cluster's
processes and nodes.

Imports nothing but the standard library and ``errors``: any cluster module may
import it, and ``python -m dvcray_cli.clusters.idle`` finds nothing of its own loaded.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Callable

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
