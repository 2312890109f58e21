"""dvcray_cli.integrations: DVCLive callbacks for Ray Tune and Ray Train, DVC's variables for workers.

Fast tests cover the environment filter and the runtime-env hook. The end-to-end
tests run a real ``dvc exp run`` (and ``dvcray run``) of a project with a small
Tune stage and a small Ray Train stage against the session's ``ray start`` head,
not ``ray.cluster_utils``: there, Ray's processes would inherit pytest's cwd and
environment, and a callback that relied on them would pass for the wrong reason.
Each callback records which process wrote the DVCLive files, from where, and
when; the workers report their pid and what they see of DVC's variables.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import exp_metrics, exp_refs, run_dvcray, sh

PLANTED_TOKEN = "isat_planted-studio-token-0123456789"

# --- the environment filter and the hook ----------------------------------------------------------


def test_dvc_env_vars_keeps_dvcs_variables_and_drops_secrets():
    from dvcray_cli.integrations.dvclive import dvc_env_vars

    environ = {
        "DVC_ROOT": "/work/ws", "DVC_EXP_NAME": "exp-1", "DVC_EXP_BASELINE_REV": "a" * 40,
        "DVC_STAGE": "train", "DVC_STUDIO_OFFLINE": "true", "DVCLIVE_LOGLEVEL": "DEBUG",
        "DVC_STUDIO_URL": "https://studio.example.com",
        "DVC_STUDIO_TOKEN": PLANTED_TOKEN, "DVC_STUDIO_REPO_URL": "https://user:pw@git.example.com/r.git",
        "DVC_MY_SECRET": "x", "DVC_S3_PASSWORD": "x", "DVC_API_KEY": "x",
        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "HOME": "/home/u", "PATH": "/bin",
    }
    assert dvc_env_vars(environ) == {
        "DVC_ROOT": "/work/ws", "DVC_EXP_NAME": "exp-1", "DVC_EXP_BASELINE_REV": "a" * 40,
        "DVC_STAGE": "train", "DVC_STUDIO_OFFLINE": "true", "DVCLIVE_LOGLEVEL": "DEBUG",
        "DVC_STUDIO_URL": "https://studio.example.com",
    }


def test_dvc_runtime_env_lets_the_stages_own_variables_win(monkeypatch):
    from dvcray_cli.integrations.dvclive import dvc_runtime_env

    monkeypatch.setenv("DVC_EXP_NAME", "from-dvc")
    monkeypatch.setenv("DVC_ROOT", "/ws")
    monkeypatch.setenv("DVC_STUDIO_TOKEN", PLANTED_TOKEN)
    mine = {"pip": ["x"], "env_vars": {"DVC_ROOT": "/mine", "OTHER": "1"}}
    env = dvc_runtime_env(mine)
    assert env["pip"] == ["x"]
    assert env["env_vars"]["DVC_EXP_NAME"] == "from-dvc"
    assert env["env_vars"]["DVC_ROOT"] == "/mine" and env["env_vars"]["OTHER"] == "1"
    assert "DVC_STUDIO_TOKEN" not in env["env_vars"]
    assert mine["env_vars"] == {"DVC_ROOT": "/mine", "OTHER": "1"}     # not changed


def test_runtime_env_hook_passes_dvcs_variables(monkeypatch, tmp_path):
    from dvcray_cli.integrations.runtime_env import hook

    monkeypatch.setenv("DVCRAY_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "from-dvc")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STUDIO_TOKEN", PLANTED_TOKEN)
    env = hook({"env_vars": {"DVC_EXP_NAME": "the-stages-own"}})
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"]["DVC_EXP_NAME"] == "the-stages-own"
    assert env["env_vars"]["DVC_ROOT"] == str(tmp_path)
    assert "DVC_STUDIO_TOKEN" not in env["env_vars"]


def test_importing_the_integration_imports_neither_ray_nor_dvclive():
    code = ("import sys, dvcray_cli.integrations.dvclive\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'dvclive', 'dvc', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_callbacks_pickle_without_their_open_live(tmp_path, monkeypatch):
    import cloudpickle

    from dvcray_cli.integrations.dvclive import DVCLiveTrainCallback

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STUDIO_TOKEN", PLANTED_TOKEN)
    callback = DVCLiveTrainCallback("logs", step_metric="epoch")
    callback.after_report(None, [{"epoch": 1, "loss": 0.5, "name": "text is skipped"}], None)
    data = cloudpickle.dumps(callback)
    assert PLANTED_TOKEN.encode() not in data
    copy = cloudpickle.loads(data)
    assert copy.live_folder.path == str(tmp_path / "logs") and copy.live_folder._live is None
    assert copy.live_folder.env["DVC_ROOT"] == str(tmp_path)
    rows = _tsv(tmp_path / "logs/plots/metrics/loss.tsv")
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "0.5")]


# --- end to end: dvc exp run / dvcray run against a `ray start` head --------------------------

COMMON_PY = """\
import json, os, sys, time
from pathlib import Path

import ray
import yaml

STEPS = 3


def init(stage):
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Workers get this module's functions by value: without dvcray, nothing ships src/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    how = yaml.safe_load(open("params.yaml"))["runtime_env"][stage]
    if how == "dvc":
        from dvcray_cli.integrations.dvclive import dvc_runtime_env
        ray.init(runtime_env=dvc_runtime_env())
    else:
        ray.init()     # under dvcray run, its runtime-env hook passes DVC's variables


def worker_view(expected_exp_name):
    return {"worker_pid": os.getpid(), "worker_time": time.time(),
            "sees_token": int("DVC_STUDIO_TOKEN" in os.environ),
            "sees_exp_name": int(os.environ.get("DVC_EXP_NAME") == expected_exp_name)}


def record(cwd, name, live_folder, result, step):
    \"\"\"What the process that wrote a DVCLive step knows of itself (one JSON line).\"\"\"
    rows = Path(live_folder.path, "plots", "metrics", "score.tsv").read_text().splitlines()
    live = live_folder._live
    line = {"pid": os.getpid(), "cwd": os.getcwd(), "node": ray.get_runtime_context().get_node_id(),
            "time": time.time(), "step": step, "tsv_rows": len(rows) - 1,
            "env_had_dvc_root": "DVC_ROOT" in os.environ,
            "inside_dvc_exp": live._inside_dvc_exp, "save_dvc_exp": live._save_dvc_exp,
            **{k: result[k] for k in ("worker_pid", "worker_time", "sees_token", "sees_exp_name")}}
    Path(cwd, "records").mkdir(exist_ok=True)
    with open(Path(cwd, "records", name), "a") as stream:
        stream.write(json.dumps(line) + "\\n")


def driver_record(name):
    Path("records").mkdir(exist_ok=True)
    Path("records", name).write_text(json.dumps({
        "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(),
        "fit_returned": time.time()}))
"""

TUNE_PY = """\
import os, time
from ray import tune
from common import STEPS, driver_record, init, record, worker_view
from dvcray_cli.integrations.dvclive import DVCLiveTuneCallback


def trial(config):
    for step in range(1, STEPS + 1):
        time.sleep(0.3)
        tune.report({"step": step, "score": config["x"] * step, **worker_view(config["exp_name"])})


class Recorded(DVCLiveTuneCallback):
    def log_result(self, trial, result):
        super().log_result(trial, result)
        record(self.cwd, f"tune-{trial.trial_id.rsplit('_', 1)[-1]}.jsonl", self.folder(trial), result,
               result["step"])


init("tune")
tuner = tune.Tuner(
    tune.with_resources(trial, {"cpu": 1}),
    param_space={"x": tune.grid_search([1, 2]), "exp_name": os.environ["DVC_EXP_NAME"]},
    run_config=tune.RunConfig(storage_path=os.path.abspath(".ray_results"), name=f"tune-{os.getpid()}",
                              callbacks=[Recorded("dvclive/tune", step_metric="step")], verbose=0),
)
results = tuner.fit()
assert not results.errors, results.errors
driver_record("tune-driver.json")
"""

TRAIN_PY = """\
import os, time
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from common import STEPS, driver_record, init, record, worker_view
from dvcray_cli.integrations.dvclive import DVCLiveTrainCallback


def loop(config):
    import torch
    torch.manual_seed(0)
    net = ray.train.torch.prepare_model(torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 2)
    y = x.sum(1, keepdim=True)
    for epoch in range(1, STEPS + 1):
        loss = ((net(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(0.3)
        ray.train.report({"epoch": epoch, "score": float(loss), **worker_view(config["exp_name"])})


class Recorded(DVCLiveTrainCallback):
    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, metrics, checkpoint)
        record(self.live_folder.cwd, "train.jsonl", self.live_folder, metrics[0], metrics[0]["epoch"])


os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
init("train")
TorchTrainer(
    loop, train_loop_config={"exp_name": os.environ["DVC_EXP_NAME"]},
    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
    run_config=RunConfig(storage_path=os.path.abspath(".ray_results"), name=f"train-{os.getpid()}",
                         callbacks=[Recorded("dvclive/train", step_metric="epoch")]),
).fit()
driver_record("train-driver.json")
"""

DVC_YAML = """\
stages:
  tune:
    cmd: python src/tune_stage.py
    deps: [src/tune_stage.py, src/common.py]
    params: [runtime_env]
    outs:
      - dvclive/tune: {cache: false}
  train:
    cmd: python src/train_stage.py
    deps: [src/train_stage.py, src/common.py]
    params: [runtime_env]
    outs:
      - dvclive/train: {cache: false}
metrics:
  - dvclive/train/metrics.json
  - dvclive/tune/trial-1/metrics.json
plots:
  - dvclive/train/plots/metrics:
      x: step
"""


def _project(make_dvc_project) -> Path:
    return make_dvc_project({
        "src/common.py": COMMON_PY,
        "src/tune_stage.py": TUNE_PY,
        "src/train_stage.py": TRAIN_PY,
        "dvc.yaml": DVC_YAML,
        # The tune stage passes DVC's variables to its workers itself; the train stage
        # calls a plain ray.init(), so its controller has none of them.
        "params.yaml": "runtime_env:\n  tune: dvc\n  train: plain\n",
        # The records are the test's instrument, not the experiment's.
        ".gitignore": ".ray_results/\nrecords/\n",
    })


def _tsv(path: Path) -> list[dict]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_dvclive_files(read) -> None:
    """The per-step files of both stages, through ``read(relative path) -> text``."""
    for folder in ("dvclive/tune/trial-0", "dvclive/tune/trial-1", "dvclive/train"):
        summary = json.loads(read(f"{folder}/metrics.json"))
        assert summary["step"] == 3, folder
        for name in ("score", "worker_pid", "sees_token"):
            rows = list(csv.DictReader(read(f"{folder}/plots/metrics/{name}.tsv").splitlines(), delimiter="\t"))
            assert [int(r["step"]) for r in rows] == [1, 2, 3], (folder, name)
        # The step metric is DVCLive's step (metrics.json has it as "step"); Tune's own keys are not metrics.
        for skipped in ("epoch", "time_total_s", "training_iteration", "timestamp"):
            assert skipped not in summary, (folder, skipped)
    tune_scores = [float(r["score"]) for r in
                   csv.DictReader(read("dvclive/tune/trial-1/plots/metrics/score.tsv").splitlines(), delimiter="\t")]
    assert tune_scores == [2, 4, 6]


def _check_writers(root: Path, workers_see_exp_name: dict[str, bool]) -> list[dict]:
    """The DVCLive files were written live, by the driver (Tune) and Train's controller, not a worker."""
    tune_driver = json.loads((root / "records/tune-driver.json").read_text())
    train_driver = json.loads((root / "records/train-driver.json").read_text())
    tune = [_jsonl(root / f"records/tune-{i:05d}.jsonl") for i in (0, 1)]
    train = _jsonl(root / "records/train.jsonl")

    for rows in tune:
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["pid"] == tune_driver["pid"] != r["worker_pid"] for r in rows)
        assert all(r["tsv_rows"] == r["step"] for r in rows)        # one row per step, as it came
        # Written as the results came, not after: a logger of the finished run would write after fit().
        assert rows[-1]["time"] < tune_driver["fit_returned"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        # Train's controller: another process than the stage's and the worker's, on the driver's node,
        # whose cwd is not the workspace.
        assert r["pid"] not in (train_driver["pid"], r["worker_pid"])
        assert r["node"] == train_driver["node"]
        assert r["cwd"] != train_driver["cwd"]
        assert r["tsv_rows"] == r["step"]
    assert train[-1]["time"] < train_driver["fit_returned"]
    for r in [*tune[0], *tune[1], *train]:
        assert r["inside_dvc_exp"] is True and r["save_dvc_exp"] is False
        assert r["sees_token"] == 0                   # DVC_STUDIO_TOKEN never reaches a worker
    for rows, stage in ((tune[0] + tune[1], "tune"), (train, "train")):
        assert all(r["sees_exp_name"] == int(workers_see_exp_name[stage]) for r in rows), stage
    return train


def _driver_env(ray_head) -> dict[str, str]:
    """dvc exp run's environment: the stages' ray.init() joins the session head; a Studio token is set."""
    return {"RAY_ADDRESS": ray_head.gcs_address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token(),
            "DVC_STUDIO_TOKEN": PLANTED_TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_dvc_exp_run_logs_tune_and_train_live_from_the_driver_side(ray_cluster, make_dvc_project):
    root = _project(make_dvc_project)
    proc = subprocess.run(["dvc", "exp", "run", "-n", "direct"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, **_driver_env(ray_cluster)}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]

    _check_dvclive_files(lambda rel: (root / rel).read_text())
    train = _check_writers(root, {"tune": True, "train": False})
    # The train stage's plain ray.init() gave the controller none of DVC's variables: the
    # callback brought them (DVCLive knew it ran inside dvc exp run).
    assert not any(r["env_had_dvc_root"] for r in train)

    metrics = exp_metrics(root, "direct", "dvclive/train/metrics.json")
    assert metrics["step"] == 3 and set(metrics) >= {"score", "worker_pid", "sees_token", "sees_exp_name"}
    assert exp_metrics(root, "direct", "dvclive/tune/trial-1/metrics.json")["score"] == 6
    # DVCLive edited no dvc.yaml.
    assert (root / "dvc.yaml").read_text() == DVC_YAML
    assert not list((root / "dvclive").rglob("dvc.yaml"))


@pytest.mark.slow
def test_dvcray_run_logs_dvclive_into_the_experiment(ray_cluster, make_dvc_project, tmp_path):
    root = _project(make_dvc_project)
    # Both stages call a plain ray.init(): dvcray's runtime-env hook gives workers DVC's variables.
    proc = run_dvcray("run", "-n", "remote", "-S", "runtime_env.tune=plain", "--store", str(tmp_path / "store"),
                      cwd=root, env={"DVC_STUDIO_TOKEN": PLANTED_TOKEN}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    ref = next(r for r in exp_refs(root) if r.endswith("/remote"))

    _check_dvclive_files(lambda rel: sh("git", "show", f"{ref}:{rel}", cwd=root))
    metrics = exp_metrics(root, "remote", "dvclive/train/metrics.json")
    assert metrics["step"] == 3
    assert metrics["sees_exp_name"] == 1 and metrics["sees_token"] == 0
    tune = exp_metrics(root, "remote", "dvclive/tune/trial-1/metrics.json")
    assert tune["score"] == 6 and tune["sees_exp_name"] == 1 and tune["sees_token"] == 0

