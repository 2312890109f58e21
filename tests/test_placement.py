"""Where runners go for --cpus-per-exp/--gpus-per-exp (placement.decide), without Ray:
the cluster's nodes and record are stand-ins. The real thing runs in test_multinode.py."""

from __future__ import annotations

import pytest

from dvcray_cli import cluster, placement
from dvcray_cli.errors import UsageError


def node(cpus: float, head: bool = False, gpus: float = 0) -> dict:
    resources = {"CPU": cpus} if cpus else {}
    if gpus:
        resources["GPU"] = gpus
    return {"node_id": "h" if head else "w", "ip": "x", "is_head": head, "alive": True, "state": "ALIVE",
            "resources": resources}


@pytest.fixture
def fake_cluster(monkeypatch):
    """Set the alive nodes and, optionally, the most a recorded cluster can grow to."""

    def make(nodes: list[dict], most: dict | None = None, recorded: bool = True):
        monkeypatch.setattr(placement, "_alive_nodes", lambda address: nodes)
        record = cluster.LocalCluster("c", "127.0.0.1:1", "http://127.0.0.1:2", "/nowhere", "", "", None,
                                      autoscaling_config="/x.yaml" if most is not None else None)
        monkeypatch.setattr(cluster, "recorded_at", lambda address: record if recorded else None)
        monkeypatch.setattr(cluster, "max_resources", lambda c: most)

    return make


@pytest.mark.parametrize("total,per_exp,expected", [(3, 1, 2), (2, 1, 1), (1, 1, 1), (0, 1, 1), (8, 2, 3),
                                                    (32, 8, 3), (4, 0.5, 7)])
def test_runners_at_once_leave_one_runners_worth_free(total, per_exp, expected):
    assert placement.at_once(total, per_exp) == expected


def test_nothing_asked_is_the_head_as_before(fake_cluster):
    fake_cluster([node(0, head=True)])
    p = placement.decide("a", None, None, True, "/store")
    assert not p.placed and p.submit_options() == {} and p.note is None


def test_s3_store_reserves_and_limits_by_what_the_cluster_can_grow_to(fake_cluster):
    fake_cluster([node(0, head=True), node(1)], most={"CPU": 3})
    p = placement.decide("a", 1, None, False, "s3://b/p", experiments=4)
    assert p.submit_options() == {"entrypoint_num_cpus": 1}
    assert p.limit == 2
    assert "At most 2 experiment(s) at once" in p.note and "at most 3 CPU" in p.note
    # One experiment: nothing held back, nothing to say.
    assert placement.decide("a", 1, None, False, "s3://b/p", experiments=1).note is None


def test_more_than_the_cluster_can_ever_have_is_a_usage_error(fake_cluster):
    fake_cluster([node(0, head=True), node(1)], most={"CPU": 3})
    with pytest.raises(UsageError, match="more than this cluster can ever have"):
        placement.decide("a", 4, None, False, "s3://b/p")
    with pytest.raises(UsageError, match="--gpus-per-exp"):
        placement.decide("a", None, -1, False, "s3://b/p")


def test_a_cluster_of_unknown_size_limits_by_what_it_has_now_unless_jobs_is_given(fake_cluster):
    fake_cluster([node(0, head=True), node(2)], recorded=False)
    p = placement.decide("a", 1, None, False, "s3://b/p", experiments=3)
    assert p.limit == 1 and "has now 2 CPU" in p.note and "--jobs" in p.note
    p = placement.decide("a", 1, None, False, "s3://b/p", experiments=3, jobs=3)
    assert p.limit is None and p.note is None and p.submit_options() == {"entrypoint_num_cpus": 1}


def test_local_store_keeps_runners_on_a_head_with_room(fake_cluster):
    fake_cluster([node(4, head=True)])  # one node: nothing to say
    p = placement.decide("a", 1, None, True, "/store", experiments=2)
    assert p.submit_options() == {"entrypoint_num_cpus": 1, "entrypoint_resources": {placement.HEAD_RESOURCE: 0.001}}
    assert p.limit == 3 and p.note is None
    fake_cluster([node(4, head=True), node(4)])
    p = placement.decide("a", 1, None, True, "/store")
    assert p.resources and "only the head reaches" in p.note and "S3" in p.note


def test_local_store_and_a_head_without_room_runs_unreserved_and_says_why(fake_cluster):
    fake_cluster([node(0, head=True), node(1)], most={"CPU": 3})
    p = placement.decide("a", 1, None, True, "/store", experiments=3)
    assert not p.placed and p.submit_options() == {}
    assert "/store" in p.note and "head has 0 CPU" in p.note and "without a reservation" in p.note
    assert "\n" not in p.note


def test_max_resources_of_the_built_in_multinode_config(tmp_path):
    from dvcray_cli.resources import cluster_configs_dir

    record = cluster.LocalCluster("m", "", "", str(tmp_path), "", "", None,
                                  autoscaling_config=str(cluster_configs_dir() / "local-multinode.yaml"))
    assert cluster.max_resources(record)["CPU"] == 3
    types = cluster.node_types(record)
    assert types == {"ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 200000000},
                                        "min_workers": 1, "max_workers": 3}}


def test_the_built_in_multinode_config_has_every_key_the_provider_needs(tmp_path):
    """Ray's wheel lacks fake_multinode's defaults: a missing key kills its autoscaler."""
    import yaml

    from dvcray_cli.resources import cluster_configs_dir

    config = yaml.safe_load((cluster_configs_dir() / "local-multinode.yaml").read_text())
    for key in ("cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
                "docker", "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files",
                "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
                "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in config, key
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for key in ("disable_node_updaters", "use_node_id_as_ip", "disable_launch_config_check",
                "foreground_node_launch"):
        assert provider[key] is True, key
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0
    # dvcray gives the fake nodes this cluster's own GCS (else they join port 6379, whoever has it).
    path, fake = cluster._resolve_autoscaling_config(cluster_configs_dir() / "local-multinode.yaml", tmp_path, 5555)
    assert fake and yaml.safe_load(path.read_text())["provider"]["gcs_address"] == "127.0.0.1:5555"
