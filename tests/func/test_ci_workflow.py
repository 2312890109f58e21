"""The GitHub workflow that ``dvcray scaffold mnist`` writes, run step by step as written
against a local cluster, with a local bare repository as ``origin``.

Its Install step runs too: in a fresh virtual environment, ``pip install -r
requirements.txt`` installs dvcray from a wheel of this checkout (the only dvcray pip can
find: no package index is reached, ``PIP_NO_INDEX`` and, as root, a loopback-only
network namespace), and the packages this test environment already has (torch, Ray, DVC)
are there already, as a runner's cache would have them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, exp_metrics, run_dvcray, run_in_loopback_namespace, sh, venv_with_these_packages

SMALL = ["data.source=digits", "tune.num_samples=2", "tune.max_epochs=1", "tune.grace_period=1",
         "train.epochs=1", "train.num_workers=1"]


def condition_holds(expr: str | None, env: dict[str, str], failed: bool) -> bool:
    """The few GitHub expressions the workflow uses: always(), env.X == '', &&."""
    if expr is None:
        return not failed
    python = expr.replace("&&", " and ").replace("||", " or ").replace("always()", "True")
    python = re.sub(r"env\.(\w+)", lambda m: repr(env.get(m.group(1), "")), python)
    holds = bool(eval(python, {"__builtins__": {}}, {}))  # noqa: S307 - our own fixed workflow file
    return holds if "always()" in expr else holds and not failed


@pytest.mark.slow
def test_scaffolded_workflow_runs_in_order(tmp_path, isolated_env):
    project = tmp_path / "mnist"
    args = ["scaffold", "mnist", str(project)]
    for item in SMALL:
        args += ["--set", item]
    run_dvcray(*args, check=True)
    workflow = yaml.safe_load((project / ".github" / "workflows" / "dvcray.yml").read_text())
    origin = tmp_path / "origin.git"
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    sh("git", "remote", "add", "origin", str(origin), cwd=project)
    sh("git", "push", "-q", "origin", "HEAD", cwd=project)
    sha = sh("git", "rev-parse", "HEAD", cwd=project)
    summary = tmp_path / "summary.md"

    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(wheels), str(REPO)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    runner_bin = venv_with_these_packages(tmp_path / "runner-venv")

    job = workflow["jobs"]["experiment"]
    env = {**os.environ, "GITHUB_SHA": sha, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTOR": "ci-bot",
           "RAY_ADDRESS": "", "RAY_AUTH_TOKEN": "", "EXP_NAME": f"ci-{sha}", "CI": "true",
           # The runner's Python first: its pip and the dvcray it installs (dvc and ray's scripts
           # come from this environment's folder after it).
           "PATH": f"{runner_bin}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(runner_bin.parent),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_CONFIG_FILE": os.devnull}
    env.pop("RAY_ADDRESS")  # the repository variable is unset: the job starts its own cluster
    ran, failed = [], False
    for step in job["steps"]:
        if "run" not in step:  # actions (checkout, setup-python): this machine has both
            continue
        if not condition_holds(step.get("if"), env, failed):
            continue
        command = ["bash", "-e", "-c", step["run"]]
        if step.get("id") == "install" and os.geteuid() == 0:
            proc = run_in_loopback_namespace(command, timeout=600, cwd=project, env=env)
        else:
            proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        ran.append((step["name"], proc.returncode, proc.stderr[-2000:]))
        failed = failed or proc.returncode != 0
    assert not failed, ran
    assert [name for name, *_ in ran] == ["Install", "Git identity for the experiment's commit",
                                         "Start a local cluster", "Run the experiment", "Report",
                                         "Push the experiment", "Stop the local cluster"]
    # The dvcray that ran is the wheel the Install step installed, not this checkout.
    where = subprocess.run([str(runner_bin / "python"), "-c", "import dvcray_cli; print(dvcray_cli.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(runner_bin.parent)) and "site-packages" in where.stdout, where
    name = f"ci-{sha[:7]}"
    result = json.loads((project / "dvcray-result.json").read_text())
    assert result["status"] == "SUCCEEDED" and result["exp_name"] == name
    accuracy = result["metrics"]["dvclive/evaluate/metrics.json"]["test_accuracy"]
    assert 0 < accuracy <= 1, result["metrics"]
    assert exp_metrics(project, name, "dvclive/evaluate/metrics.json")["test_accuracy"] == accuracy, \
        "the experiment in the repo has the metrics of the run"
    text = summary.read_text()
    assert f"| {name} |" in text and "(baseline)" in text
    assert name in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=origin)
    assert not (isolated_env / ".dvcray" / "clusters" / "local.json").exists()  # the cluster went down

