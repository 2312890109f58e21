"""``--gpus-per-exp`` end to end, on nodes that declare GPUs (no GPU needed: Ray counts the
GPUs a node declares and hands out their ids; this is how Ray's own tests do it).

A cluster of Ray's ``fake_multinode`` provider (real raylets on this machine, started by
the autoscaler): a head with nothing to give, a CPU worker (2 CPUs) and a GPU worker
(1 CPU, 2 GPUs). The store is S3 (a moto server on 127.0.0.1), as placed runners need.
"""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import REPO, bucket_objects, exp_metrics, run_dvcray, running_head, s3_default_remote, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    from dvcray_cli.clusters import local

    config = yaml.safe_load((REPO / "cluster-configs" / "local-multinode.yaml").read_text())
    config["cluster_name"] = "dvcray-test-gpus"
    config["max_workers"] = 2
    config["available_node_types"] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 1, "max_workers": 1},
        "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 2}, "node_config": {}, "min_workers": 1,
                           "max_workers": 1},
    }
    folder = tmp_path_factory.mktemp("gpu-cluster")
    path = folder / "gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    with running_head(folder / "home", "pytest-gpus", autoscaling_config=path, env={
            "AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": "node-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}) as head:
        yield head, local.wait_for_workers(head, timeout=300)


# Two experiments meet (each waits until two have started, at most two minutes), then
# each says which GPUs it was given and on which Ray node it ran.
STAGE = """\
import json, os, sys, time, yaml
from pathlib import Path
x = yaml.safe_load(open("params.yaml"))["x"]
meet = Path(sys.argv[1])
(meet / str(x)).touch()
deadline = time.time() + 120
while len(list(meet.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.2)
json.dump({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "node": os.environ.get("DVCRAY_RAY_NODE"),
           "met": len(list(meet.iterdir()))}, open("m.json", "w"))
"""


def test_placed_runners_get_a_gpu_node_and_gpus_of_their_own(gpu_cluster, s3_bucket, make_dvc_project, tmp_path,
                                                             monkeypatch):
    head, nodes = gpu_cluster
    endpoint, bucket = s3_bucket
    meet = tmp_path / "meet"
    meet.mkdir()
    root = make_dvc_project({
        "params.yaml": "x: 0\n", "stage.py": STAGE,
        "dvc.yaml": f"stages:\n  s:\n    cmd: python stage.py {meet}\n    deps: [stage.py]\n    params: [x]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    }, commit=False)
    s3_default_remote(root, endpoint, bucket)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "gpu project", cwd=root)
    monkeypatch.setenv("RAY_ADDRESS", head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token())

    proc = run_dvcray("run", "-n", "gpu", "-S", "x=8101,8102,8103", "--gpus-per-exp", "1", "--jobs", "3",
                      cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    gpu_node = next(n["node_id"] for n in nodes if n["resources"].get("GPU"))
    seen = {i: exp_metrics(root, f"gpu-{i}", "m.json") for i in (1, 2, 3)}
    results = {json.loads(data)["exp_name"]: json.loads(data) for key, data in bucket_objects(endpoint, bucket).items()
               if key.endswith("/result.json")}
    for i, metrics in seen.items():
        assert metrics["node"] == gpu_node == results[f"gpu-{i}"]["ray_node"], (i, metrics, gpu_node)
        assert metrics["cuda"] in ("0", "1"), f"gpu-{i} was given {metrics['cuda']!r}, not one GPU of the node's two"
    # The node has two GPUs: the two that met held one each, never the same one; the third
    # waited for one of them to end.
    spans = {name: (r["started"], r["ended"]) for name, r in results.items()}
    for a in seen:
        for b in seen:
            (sa, ea), (sb, eb) = spans[f"gpu-{a}"], spans[f"gpu-{b}"]
            if a < b and sa < eb and sb < ea:
                assert seen[a]["cuda"] != seen[b]["cuda"], (a, b, seen, spans)
    assert sum(1 for m in seen.values() if m["met"] >= 2) == 3
    ordered = sorted(spans.values())
    assert max(sum(1 for s, e in ordered if s <= t < e) for t, _ in ordered) == 2, spans
