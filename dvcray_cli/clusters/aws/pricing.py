"""Cost estimates for AWS clusters from the dated price table that ships with dvcray.

``dvcray_cli/data/aws_prices.json`` holds on-demand list prices per region and
instance type and the date they were compiled (``as_of``). Nothing here asks
AWS: a plan's cost is an estimate, and says so with the table's date.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Any


@dataclass
class NodeCount:
    """Instances of one type in a plan."""

    instance_type: str
    spot: bool
    min_count: int
    max_count: int


@dataclass
class CostRange:
    """An hourly cost range in USD, and what it could not price."""

    low: float
    high: float
    as_of: str
    unpriced: list[str] = field(default_factory=list)  # instance types missing from the table
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"low_usd_per_hour": round(self.low, 4), "high_usd_per_hour": round(self.high, 4),
                "as_of": self.as_of, "unpriced": self.unpriced, "note": self.note}


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """The shipped price table."""
    return json.loads((files("dvcray_cli") / "data" / "aws_prices.json").read_text())


def on_demand(region: str, instance_type: str) -> float | None:
    """The on-demand hourly price of ``instance_type`` in ``region``, None if not in the table."""
    return table()["on_demand"].get(region, {}).get(instance_type)


def hourly(region: str, instance_type: str, spot: bool) -> tuple[float, float] | None:
    """(low, high) hourly price of one instance: spot ranges from the table's
    low fraction of on-demand up to on-demand (AWS's default spot maximum)."""
    price = on_demand(region, instance_type)
    if price is None:
        return None
    if spot:
        return price * float(table()["spot"]["low_fraction"]), price
    return price, price


def estimate(region: str, nodes: list[NodeCount]) -> CostRange:
    """The cluster's hourly cost: ``low`` with every type at its minimum count and
    spot at its low estimate, ``high`` at maximum counts and on-demand prices."""
    low = high = 0.0
    unpriced = []
    for node in nodes:
        price = hourly(region, node.instance_type, node.spot)
        if price is None:
            if node.instance_type not in unpriced:
                unpriced.append(node.instance_type)
            continue
        low += node.min_count * price[0]
        high += node.max_count * price[1]
    t = table()
    return CostRange(low, high, t["as_of"], unpriced,
                     f"{t['source'].split(' (')[0]}. {t['spot']['note']} Excludes {t['excludes']}")


def cost_so_far(region: str, instances: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    """The estimated cost of ``instances`` since they started.

    Args:
        instances: ``{"instance_type", "spot", "hours"}`` each.

    Returns:
        ``(low, high, unpriced instance types)`` in USD.
    """
    low = high = 0.0
    unpriced: list[str] = []
    for inst in instances:
        price = hourly(region, inst["instance_type"], bool(inst.get("spot")))
        if price is None:
            unpriced.append(inst["instance_type"])
            continue
        low += price[0] * inst["hours"]
        high += price[1] * inst["hours"]
    return low, high, unpriced
