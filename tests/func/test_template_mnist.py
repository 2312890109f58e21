"""The mnist template: what `dvcray scaffold mnist` makes must run and learn.

Fast tests run the prepare stage's downloader against a server on 127.0.0.1
(and a closed port); the slow test runs the whole pipeline with `dvc exp run`
on scikit-learn's digits and checks its metrics, plots and outputs.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import http.server
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

PYTHON = sys.executable


def _env(home: Path) -> dict[str, str]:
    """A subprocess environment of its own: HOME (Ray's token, DVC's and git's config), a git
    identity, no telemetry, this interpreter's scripts first on PATH, and no RAY_ADDRESS, so
    every stage starts (and stops) a Ray of its own."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DVC_", "GIT_"))}
    env.update({
        "HOME": str(home),
        "PATH": os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", ""),
        "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true",
        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
    })
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _scaffold(dest: Path, env: dict, *sets: str) -> None:
    args = [PYTHON, "-m", "dvcray_cli", "scaffold", "mnist", str(dest)]
    for item in ("data.source=digits", *sets):
        args += ["--set", item]
    proc = _run(args, dest.parent, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _edit_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# --- prepare: the MNIST downloader ------------------------------------------------------------

def _idx_gz(array: np.ndarray) -> bytes:
    """``array`` (uint8) as a gzip-compressed idx file, as MNIST's mirrors serve them."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    """Tiny MNIST-shaped idx.gz files, served over HTTP on 127.0.0.1.

    Yields (base URL, files as src/mnist_download.yaml lists them, arrays in that order).
    """
    root = tmp_path / "mirror"
    (root / "mnist").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, 50, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, 20, dtype=np.uint8)}
    files = []
    for i, (key, array) in enumerate(arrays.items()):
        name = f"{key}-idx.gz"
        data = _idx_gz(array)
        (root / "mnist" / name).write_bytes(data)
        # Both kinds of checksum the params accept.
        algorithm = "sha256" if i % 2 else "md5"
        files.append({"name": name, algorithm: hashlib.new(algorithm, data).hexdigest()})

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", files, arrays
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _use_mirrors(project: Path, mirrors: list[str], files: list | None = None) -> None:
    _edit_params(project, lambda params: params["data"].update(source="mnist"))
    path = project / "src" / "mnist_download.yaml"   # where MNIST comes from: configuration, not params
    download = yaml.safe_load(path.read_text())
    download.update(mirrors=mirrors, timeout=5, **({"files": files} if files is not None else {}))
    path.write_text(yaml.safe_dump(download, sort_keys=False))


@pytest.fixture
def project(tmp_path):
    env = _env(tmp_path / "home")
    dest = tmp_path / "proj"
    _scaffold(dest, env)
    return dest, env


def test_prepare_download_failure_names_the_digits_fallback(project):
    dest, env = project
    _use_mirrors(dest, [f"http://127.0.0.1:{_closed_port()}/"])
    proc = _run([PYTHON, "src/prepare.py"], dest, env, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr            # one line, no traceback
    assert "data.source=digits" in lines[0]
    assert "-S data.source=digits" in lines[0] and "--set data.source=digits" in lines[0]
    assert not (dest / "data/prepared/data.npz").exists()


def test_prepare_downloads_and_checks_mnist(project, fake_mnist):
    dest, env = project
    url, files, arrays = fake_mnist
    # The first mirror is down: the second one serves.
    _use_mirrors(dest, [f"http://127.0.0.1:{_closed_port()}/", url], files)
    proc = _run([PYTHON, "src/prepare.py"], dest, env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with np.load(dest / "data/prepared/data.npz") as data:
        out = {key: data[key] for key in data.files}
    assert len(out["x_train"]) + len(out["x_val"]) == 50
    assert len(out["x_val"]) == 5                       # val_fraction 0.1
    np.testing.assert_array_equal(out["x_test"], arrays["test_images"])
    np.testing.assert_array_equal(out["y_test"], arrays["test_labels"])
    # Train and validation together are the training set, reshuffled.
    train_all = np.concatenate([out["x_train"], out["x_val"]])
    assert sorted(map(bytes, train_all)) == sorted(map(bytes, arrays["train_images"]))
    for spec in files:
        assert (dest / "data/raw" / spec["name"]).is_file()    # kept: a rerun needs no network


def test_prepare_rejects_a_wrong_checksum(project, fake_mnist):
    dest, env = project
    url, files, _ = fake_mnist
    files[1] = {"name": files[1]["name"], "md5": "0" * 32}      # the training labels
    _use_mirrors(dest, [url], files)
    proc = _run([PYTHON, "src/prepare.py"], dest, env, timeout=60)
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stderr and files[1]["name"] in proc.stderr
    assert "data.source=digits" in proc.stderr
    assert not (dest / "data/raw" / files[1]["name"]).exists()
    assert not (dest / "data/prepared/data.npz").exists()


def test_params_hold_what_one_tunes(project):
    """dvc exp show in a new project is params and metrics, not download settings."""
    dest, env = project
    params = (dest / "params.yaml").read_text()
    assert "http" not in params and "md5" not in params
    # Where MNIST comes from is configuration, read by prepare, and no stage's dependency.
    download = yaml.safe_load((dest / "src" / "mnist_download.yaml").read_text())
    assert download["mirrors"] and len(download["files"]) == 4
    stages = yaml.safe_load((dest / "dvc.yaml").read_text())["stages"]
    assert not [s for s in stages.values() if "src/mnist_download.yaml" in s.get("deps", [])]
    columns = _run(["dvc", "exp", "show", "--csv"], dest, env).stdout.splitlines()[0].split(",")
    assert not [c for c in columns if "mirrors" in c or "files" in c or "mnist" in c], columns


# --- the whole pipeline -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """`dvcray scaffold mnist --set data.source=digits`, then `dvc exp run`, once per module."""
    tmp = tmp_path_factory.mktemp("mnist")
    env = _env(tmp / "home")
    dest = tmp / "proj"
    _scaffold(dest, env)
    proc = _run(["dvc", "exp", "run"], dest, env, timeout=600)
    return dest, env, proc


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def _rows(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream, delimiter=delimiter))


@pytest.mark.slow
def test_pipeline_runs_and_learns(mnist_run):
    dest, _, proc = mnist_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    metrics = json.loads((dest / "dvclive/evaluate/metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.90
    assert metrics["test_examples"] == 360       # 20% of the 1,797 digits


@pytest.mark.slow
def test_train_metrics_per_epoch_in_dvclive(mnist_run):
    dest, _, proc = mnist_run
    assert proc.returncode == 0
    epochs = _params(dest)["train"]["epochs"]
    for name in ("loss", "accuracy", "val_accuracy"):
        rows = _rows(dest / f"dvclive/train/plots/metrics/{name}.tsv", delimiter="\t")
        assert [int(r["step"]) for r in rows] == list(range(1, epochs + 1)), name
        assert all(0 <= float(r[name]) for r in rows)
    summary = json.loads((dest / "dvclive/train/metrics.json").read_text())
    assert summary["step"] == epochs and summary["val_accuracy"] > 0.8
    # DVCLive left the project's dvc.yaml alone.
    dvc_yaml = yaml.safe_load((dest / "dvc.yaml").read_text())
    assert set(dvc_yaml["stages"]) == {"prepare", "tune", "train", "evaluate"}


@pytest.mark.slow
def test_tune_outputs(mnist_run):
    dest, _, proc = mnist_run
    assert proc.returncode == 0
    tune = _params(dest)["tune"]
    best = yaml.safe_load((dest / "best_params.yaml").read_text())
    assert tune["lr"]["low"] <= best["lr"] <= tune["lr"]["high"]
    assert tune["momentum"]["low"] <= best["momentum"] <= tune["momentum"]["high"]
    trials = _rows(dest / "tune/trials.csv")
    assert len(trials) == tune["num_samples"]
    assert sum(r["best"] == "True" for r in trials) == 1
    chosen = next(r for r in trials if r["best"] == "True")
    assert float(chosen["lr"]) == pytest.approx(best["lr"], rel=1e-4)
    epochs = _rows(dest / "tune/epochs.csv")
    per_trial = {}
    for row in epochs:
        per_trial.setdefault(row["trial"], []).append(int(row["epoch"]))
    assert len(per_trial) == tune["num_samples"]
    assert max(len(e) for e in per_trial.values()) == tune["max_epochs"]
    assert min(len(e) for e in per_trial.values()) >= min(tune["grace_period"], tune["max_epochs"])
    # DVCLive, one folder per trial, one step per epoch the trial ran (written by the driver).
    for trial, trial_epochs in per_trial.items():
        for name in ("accuracy", "loss"):
            rows = _rows(dest / f"dvclive/tune/trial-{trial}/plots/metrics/{name}.tsv", delimiter="\t")
            assert [int(r["step"]) for r in rows] == sorted(trial_epochs), (trial, name)
    assert all(r["node"] for r in trials)       # the Ray node each trial ran on
    assert (dest / "tune/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best_params.yaml is in git (cache: false), Ray's trial folders are not.
    status = _run(["git", "status", "--porcelain", "--ignored"], dest, mnist_run[1]).stdout
    assert "!! .ray_results/" in status
    assert (dest / ".ray_results").is_dir()


@pytest.mark.slow
def test_model_file_loads_and_scores(mnist_run):
    dest, _, proc = mnist_run
    assert proc.returncode == 0
    import torch

    state = torch.load(dest / "models/model.pt", map_location="cpu", weights_only=True)
    spec = importlib.util.spec_from_file_location("mnist_template_model", dest / "src/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.Net()
    net.load_state_dict(state)
    with np.load(dest / "data/prepared/data.npz") as data:
        x, y = module.to_tensors(data["x_test"], data["y_test"])
    accuracy = module.accuracy(net, x, y, torch.device("cpu"))
    recorded = json.loads((dest / "dvclive/evaluate/metrics.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)


@pytest.mark.slow
def test_exp_show_and_plots_show(mnist_run):
    dest, env, proc = mnist_run
    assert proc.returncode == 0
    shown = _run(["dvc", "exp", "show", "--json"], dest, env)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    experiments = [exp for row in rows for exp in (row.get("experiments") or [])]
    assert experiments, rows
    data = experiments[0]["revs"][0]["data"]
    assert data["metrics"]["dvclive/evaluate/metrics.json"]["data"]["test_accuracy"] >= 0.90
    assert "tune/metrics.json" in data["metrics"] and "dvclive/train/metrics.json" in data["metrics"]
    assert "best_params.yaml" in data["params"]

    plots = _run(["dvc", "plots", "show", "--json"], dest, env)
    assert plots.returncode == 0, plots.stderr
    shown_plots = json.loads(plots.stdout)
    assert not shown_plots.get("errors"), shown_plots.get("errors")
    plot_data = shown_plots["data"]
    assert "tune/accuracy.png" in plot_data
    assert {"Confusion matrix on the test set", "Train, accuracy per epoch", "Train, loss per epoch",
            "Tune trials, validation accuracy by learning rate"} <= set(plot_data)
    confusion = plot_data["Confusion matrix on the test set"][0]["content"]["data"]["values"]
    assert len(confusion) == 360
    for path in ("dvclive/evaluate/plots/sklearn/confusion_matrix.json",
                 "dvclive/train/plots/metrics/accuracy.tsv", "tune/trials.csv", "tune/accuracy.png"):
        assert (dest / path).is_file(), path


@pytest.mark.slow
def test_train_resumes_from_its_checkpoint_and_dvclive_continues_its_steps(mnist_run, tmp_path):
    """A retry under dvcray (the same run id, a fresh workspace): Ray Train restores the run's
    latest checkpoint, the loop starts after its epoch, and dvclive/train shows one run."""
    import shutil

    dest, env, proc = mnist_run
    assert proc.returncode == 0
    project = tmp_path / "resumed"
    shutil.copytree(dest, project, ignore=shutil.ignore_patterns(".ray_results"))
    retry_env = {**env, "DVCRAY_RUN_ID": "dvcray-20260101-000000-abcdef",
                 "DVCRAY_STORAGE_PATH": str(tmp_path / "storage")}
    _edit_params(project, lambda params: params["train"].update(epochs=2))
    first = _run([PYTHON, "src/train_model.py"], project, retry_env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "resuming" not in first.stdout
    # The machine is lost: the retry's workspace has no dvclive/train and no model.
    shutil.rmtree(project / "dvclive" / "train")
    (project / "models" / "model.pt").unlink()
    _edit_params(project, lambda params: params["train"].update(epochs=3))
    second = _run([PYTHON, "src/train_model.py"], project, retry_env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming after epoch 2" in second.stdout and "epoch 3:" in second.stdout, second.stdout[-3000:]
    assert "epoch 1:" not in second.stdout and "epoch 2:" not in second.stdout, "epochs redone"
    for name in ("loss", "accuracy", "val_accuracy"):
        rows = _rows(project / f"dvclive/train/plots/metrics/{name}.tsv", delimiter="\t")
        assert [int(r["step"]) for r in rows] == [1, 2, 3], name
    assert json.loads((project / "dvclive/train/metrics.json").read_text())["step"] == 3
    assert (project / "models" / "model.pt").exists()
