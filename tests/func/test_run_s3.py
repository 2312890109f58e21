"""``dvcray run`` with an S3 store (a moto server on 127.0.0.1, through DVC's
``endpointurl``), and the rule that secrets never reach Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import (bucket_objects, exp_metrics, node_files, project_spec, run_dvcray, running_head,
                     s3_default_remote, sh)


@pytest.fixture(scope="module")
def s3_head(tmp_path_factory):
    """A head whose nodes have (fake) AWS credentials of their own, as an AWS
    instance profile would give them. The client's credentials never travel."""
    with running_head(tmp_path_factory.mktemp("s3-head-home"), "pytest-s3", env={
            "AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": "node-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}) as head:
        yield head


PLANTED = {
    "config_local": "planted-config-local-secret-7f3a",
    "aws_env": "planted-aws-env-secret-91c2",
    "studio": "planted-studio-token-55de",
}


def test_s3_store_from_dvc_default_remote_and_no_secret_reaches_ray(s3_head, s3_bucket, make_dvc_project,
                                                                   monkeypatch):
    endpoint, bucket = s3_bucket
    spec = project_spec()
    # The stage prints the runtime env its own ray.init() gets, so the test can search it.
    spec["train.py"] = ("import ray\nray.init()\nprint('DRIVER_RUNTIME_ENV', ray.get_runtime_context().runtime_env)\n"
                        + spec["train.py"])
    root = make_dvc_project(spec, commit=False)
    s3_default_remote(root, endpoint, bucket)
    sh("dvc", "remote", "modify", "--local", "storage", "access_key_id", "client-key", cwd=root)
    sh("dvc", "remote", "modify", "--local", "storage", "secret_access_key", PLANTED["config_local"], cwd=root)
    (root / "data.csv").write_text("1\n2\n")
    sh("dvc", "add", "-q", "data.csv", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "s3 project", cwd=root)

    monkeypatch.setenv("RAY_ADDRESS", s3_head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", s3_head.token())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED["aws_env"])
    monkeypatch.setenv("DVC_STUDIO_TOKEN", PLANTED["studio"])
    monkeypatch.setenv("DVC_STUDIO_URL", "http://127.0.0.1:9")

    proc = run_dvcray("run", "-n", "ons3", "-S", "train.epochs=2", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, "ons3")["score"] == 1.0

    objects = bucket_objects(endpoint, bucket)
    run_ids = {k.split("/")[3] for k in objects if k.startswith("dvc/dvcray/runs/")}
    assert len(run_ids) == 1
    run_id = run_ids.pop()
    prefix = f"dvc/dvcray/runs/{run_id}/"
    assert json.loads(objects[prefix + "result.json"])["status"] == "SUCCEEDED"
    assert b"training with lr=0.5 epochs=2" in objects[prefix + "log.txt"]
    assert any(k.startswith("dvc/files/md5/") for k in objects), "outputs and inputs were not pushed"
    # The store's config went to the clone's config.local, never into the experiment's commit.
    exp_config = sh("git", "show", f"{_ref(root)}:.dvc/config", cwd=root)
    assert "dvcray-store" not in exp_config

    # Search everywhere the cluster keeps what a run brings: the records and logs of
    # its Ray Jobs (the runner service's), every file under the cluster's temp dir
    # (packages, session logs) and under the runner's folder on the node (snapshots,
    # the service's logs of each run); and the store.
    from dvcray_cli import clusters

    client = clusters.connect(s3_head.dashboard_url)
    jobs = client.list_jobs()
    job_text = json.dumps([{"runtime_env": j.runtime_env, "metadata": j.metadata, "entrypoint": j.entrypoint}
                           for j in jobs])
    logs = "".join(client.get_job_logs(j.submission_id) for j in jobs)
    haystacks = {"job records": job_text.encode(), "job logs": logs.encode(),
                 **{f"s3:{k}": v for k, v in objects.items()}}
    for path in node_files(s3_head):
        try:
            haystacks[str(path)] = path.read_bytes()
        except OSError:
            continue
    assert any(b"DRIVER_RUNTIME_ENV" in data for data in haystacks.values()), "the run's log was not searched"
    assert any("runtime_resources" in k or "/service/logs/" in k for k in haystacks), \
        "what the run brought to the node was not searched"
    for what, secret in PLANTED.items():
        leaks = [where for where, data in haystacks.items() if secret.encode() in data]
        assert not leaks, f"{what} leaked into {leaks}"


def _ref(root: Path) -> str:
    return sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=root).splitlines()[0]


def test_explicit_s3_store_that_cannot_be_written_is_exit_4(s3_head, s3_bucket, make_dvc_project, monkeypatch):
    endpoint, _ = s3_bucket
    root = make_dvc_project(project_spec())
    monkeypatch.setenv("RAY_ADDRESS", s3_head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", s3_head.token())
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    proc = run_dvcray("run", "-n", "nobucket", "--store", "s3://no-such-bucket-here/x", cwd=root)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "s3://no-such-bucket-here/x" in proc.stderr
