"""Clusters from any Ray YAML, without starting anything: dvcray's additions to a config,
the wheel nodes install, Ray Tune/Train's storage path, a lost node read from Ray's job info."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import zipfile
from types import SimpleNamespace

import pytest
import yaml

from helpers import REPO
from dvcray_cli import ray_api
from dvcray_cli.clusters.launcher import config as cfg
from dvcray_cli.errors import UsageError

ON_PREM = {
    "cluster_name": "lab",
    "provider": {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]},
    "auth": {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_ed25519"},
    "setup_commands": ["echo mine"],
    "head_start_ray_commands": ["ray stop", "ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml"],
    "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
}


def _added(raw=None, idle: float = 0):
    return cfg.with_additions(copy.deepcopy(raw or ON_PREM), token_path="/home/me/.dvcray/launcher/lab.token",
                              wheel_path="/home/me/.dvcray/dist/dvcray-0.1.0-py3-none-any.whl",
                              ray_version="2.60.0", dvcray_version="0.1.0", idle_timeout_s=idle)


def test_additions_ship_the_token_and_this_dvcray_and_turn_auth_on_everywhere():
    added = _added(idle=1800)
    assert added["file_mounts"] == {"~/.dvcray/auth_token": "/home/me/.dvcray/launcher/lab.token",
                                    "~/.dvcray/dist": "/home/me/.dvcray/dist"}
    assert added["setup_commands"][0] == "echo mine", "the config's own setup runs first"
    install = added["setup_commands"][-1]
    assert "the client runs Ray 2.60.0" in install and "Ray needs the same version on every node" in install
    assert "pip install -q ~/.dvcray/dist/dvcray-0.1.0-py3-none-any.whl" in install
    assert "--force-reinstall ~/.dvcray/dist/dvcray-0.1.0-py3-none-any.whl" in install
    assert "dvcray==" not in install, "never from a package index"
    head, workers = added["head_start_ray_commands"], added["worker_start_ray_commands"]
    assert head[0] == workers[0] == "ray stop"
    for command in (head[1], workers[1]):
        assert command.startswith(cfg.AUTH_ENV), command
    assert "--dashboard-host=127.0.0.1" in head[1] and "--labels=dvcray-version=0.1.0" in head[1]
    assert "--dashboard-host" not in workers[1] and "--labels" not in workers[1]
    assert head[-1].endswith("-m dvcray_cli.clusters.idle launcher --config ~/ray_bootstrap_config.yaml "
                             "--timeout 1800 --background")
    assert ON_PREM["setup_commands"] == ["echo mine"], "the input is not changed"


def test_additions_keep_what_the_config_already_says():
    raw = copy.deepcopy(ON_PREM)
    raw["head_start_ray_commands"] = [
        "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/ray/token; ray start --head --dashboard-host=0.0.0.0 "
        "--labels=team=a",
        "python -m dvcray_cli.clusters.idle launcher --timeout 60 --background"]
    raw["file_mounts"] = {"~/.dvcray/auth_token": "/srv/token"}
    added = _added(raw)
    assert added["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert added["file_mounts"]["~/.dvcray/auth_token"] == "/srv/token"
    once = added["head_start_ray_commands"][0]
    assert cfg.start_command(once, True, "0.1.0") == once


def test_the_example_on_prem_config_passes_rays_schema_with_the_additions():
    raw = yaml.safe_load((REPO / "cluster-configs" / "on-prem.yaml").read_text())
    prepared = cfg.validate_with_ray(raw, "on-prem.yaml")
    assert prepared["provider"]["worker_ips"] == ["10.0.0.11", "10.0.0.12"]
    cfg.validate_with_ray(_added(raw), "on-prem.yaml")
    assert "--num-cpus=0" in raw["head_start_ray_commands"][1]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(max_workers="many"), "schema at max_workers"),
    (lambda c: c.update(colour="blue"), "'colour' was unexpected"),
    (lambda c: c["provider"].pop("head_ip"), "Please supply a `head_ip`"),
    (lambda c: c.pop("provider"), "has no provider.type"),
])
def test_configs_ray_refuses_are_usage_errors_naming_the_key(edit, message):
    raw = copy.deepcopy(ON_PREM)
    edit(raw)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate_with_ray(raw, "lab.yaml")


def test_cluster_names_are_checked():
    assert cfg.check_name("lab-0123abcd") == "lab-0123abcd"
    with pytest.raises(UsageError, match="Invalid cluster_name"):
        cfg.check_name("my lab")


def test_the_wheel_holds_this_dvcray_and_the_same_code_gives_the_same_bytes():
    from dvcray_cli.clusters.launcher import wheel

    data = wheel.wheel_bytes()
    assert data == wheel.wheel_bytes()
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.read("dvcray_cli/runner.py") == (REPO / "dvcray_cli" / "runner.py").read_bytes()
    assert "dvcray_cli/templates/mnist/src/train_model.py" in names
    assert "dvcray_cli/cluster_configs/on-prem.yaml" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    meta = archive.read("dvcray-0.1.0.dist-info/METADATA").decode()
    assert "\nVersion: 0.1.0\n" in meta and "Requires-Dist: ray" in meta
    assert "dvcray = dvcray_cli.cli:main" in archive.read("dvcray-0.1.0.dist-info/entry_points.txt").decode()
    for line in archive.read("dvcray-0.1.0.dist-info/RECORD").decode().splitlines():
        name, digest, size = line.split(",")
        if digest:
            body = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(body), name
    assert wheel.wheel_name() == "dvcray-0.1.0-py3-none-any.whl"


def test_storage_path_uses_the_store_and_refuses_a_folder_on_machines_that_share_no_disk(monkeypatch, tmp_path):
    from dvcray_cli.integrations import storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.STORE_VAR, raising=False)
    monkeypatch.setattr(storage, "cluster_machines", lambda: 1)
    assert storage.storage_path("s3://b/ray") == "s3://b/ray"
    assert storage.storage_path(None) == str(tmp_path / ".ray_results")
    assert storage.storage_path("") == str(tmp_path / ".ray_results")
    monkeypatch.setenv(storage.STORE_VAR, "s3://store/dvc/dvcray/ray")
    assert storage.storage_path("") == "s3://store/dvc/dvcray/ray"
    assert storage.storage_path("runs") == str(tmp_path / "runs")
    monkeypatch.setattr(storage, "cluster_machines", lambda: 3)
    assert storage.storage_path("") == "s3://store/dvc/dvcray/ray"
    with pytest.raises(storage.NodeLocalStorageError, match="3 machines that share no disk"):
        storage.storage_path("runs")


def test_a_job_whose_node_died_is_told_from_one_whose_entrypoint_failed():
    died = SimpleNamespace(status="FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED", message=(
        "Job supervisor actor died: The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: JobSupervisor\n\tip: 10.213.7.11\nThe actor died because its node has died."))
    assert ray_api.node_died_of(died) == ("its node 10.213.7.11 died (Ray: Job supervisor actor died: The actor "
                                          "died unexpectedly before finishing this task.)")
    failed = SimpleNamespace(status="FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                             message="Job entrypoint command failed with exit code 1")
    assert ray_api.node_died_of(failed) is None
    assert ray_api.node_died_of(SimpleNamespace(status="SUCCEEDED", error_type="", message="")) is None
