"""Where runners go for --cpus-per-exp/--gpus-per-exp (placement.decide), without Ray:
decide is a pure function of the cluster's shape. The real thing runs in func/test_multinode.py."""

from __future__ import annotations

import pytest

from dvcray_cli.clusters import Shape
from dvcray_cli.errors import UsageError
from dvcray_cli.runs import placement


def node(cpus: float, head: bool = False, gpus: float = 0) -> dict:
    resources = {"CPU": cpus} if cpus else {}
    if gpus:
        resources["GPU"] = gpus
    return {"node_id": "h" if head else "w", "ip": "x", "is_head": head, "alive": True, "state": "ALIVE",
            "resources": resources}


def shape(nodes: list[dict], most: dict | None = None, recorded: bool = True) -> Shape:
    """A cluster of ``nodes``; ``most``: what a cluster dvcray started can grow to."""
    return Shape(nodes, {"CPU": float(most.get("CPU", 0)), "GPU": float(most.get("GPU", 0))}
                 if most is not None else None, recorded)


@pytest.mark.parametrize("total,per_exp,expected", [(3, 1, 2), (2, 1, 1), (1, 1, 1), (0, 1, 1), (8, 2, 3),
                                                    (32, 8, 3), (4, 0.5, 7)])
def test_runners_at_once_leave_one_runners_worth_free(total, per_exp, expected):
    assert placement.at_once(total, per_exp) == expected


def test_nothing_asked_is_the_head_as_before():
    p = placement.decide(None, None, None, True, "/store")
    assert not p.placed and p.submit_options() == {} and p.note is None


def test_s3_store_reserves_and_limits_by_what_the_cluster_can_grow_to():
    c = shape([node(0, head=True), node(1)], most={"CPU": 3})
    p = placement.decide(c, 1, None, False, "s3://b/p", experiments=4)
    assert p.submit_options() == {"entrypoint_num_cpus": 1}
    assert p.limit == 2
    assert "At most 2 experiment(s) at once" in p.note and "at most 3 CPU" in p.note
    # One experiment: nothing held back, nothing to say.
    assert placement.decide(c, 1, None, False, "s3://b/p", experiments=1).note is None


def test_more_than_the_cluster_can_ever_have_is_a_usage_error():
    c = shape([node(0, head=True), node(1)], most={"CPU": 3})
    with pytest.raises(UsageError, match="more than this cluster can ever have"):
        placement.decide(c, 4, None, False, "s3://b/p")
    with pytest.raises(UsageError, match="--gpus-per-exp"):
        placement.decide(c, None, -1, False, "s3://b/p")


def test_a_cluster_of_unknown_size_limits_by_what_it_has_now_unless_jobs_is_given():
    c = shape([node(0, head=True), node(2)], recorded=False)
    p = placement.decide(c, 1, None, False, "s3://b/p", experiments=3)
    assert p.limit == 1 and "has now 2 CPU" in p.note and "--jobs" in p.note
    p = placement.decide(c, 1, None, False, "s3://b/p", experiments=3, jobs=3)
    assert p.limit is None and p.note is None and p.submit_options() == {"entrypoint_num_cpus": 1}


def test_local_store_keeps_runners_on_a_head_with_room():
    c = shape([node(4, head=True)])  # one node: nothing to say
    p = placement.decide(c, 1, None, True, "/store", experiments=2)
    assert p.submit_options() == {"entrypoint_num_cpus": 1, "entrypoint_resources": {placement.HEAD_RESOURCE: 0.001}}
    assert p.limit == 3 and p.note is None
    p = placement.decide(shape([node(4, head=True), node(4)]), 1, None, True, "/store")
    assert p.resources and "only the head reaches" in p.note and "S3" in p.note


def test_local_store_and_a_head_without_room_runs_unreserved_and_says_why():
    c = shape([node(0, head=True), node(1)], most={"CPU": 3})
    p = placement.decide(c, 1, None, True, "/store", experiments=3)
    assert not p.placed and p.submit_options() == {}
    assert "/store" in p.note and "head has 0 CPU" in p.note and "without a reservation" in p.note
    assert "\n" not in p.note
