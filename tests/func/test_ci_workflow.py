"""The GitHub workflow that ``dvcray scaffold mnist`` writes, run step by step
against a local cluster, with a local bare repository as ``origin``."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml

from helpers import run_dvcray, sh

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

    job = workflow["jobs"]["experiment"]
    env = {**os.environ, "GITHUB_SHA": sha, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTOR": "ci-bot",
           "RAY_ADDRESS": "", "RAY_AUTH_TOKEN": "", "EXP_NAME": f"ci-{sha}", "CI": "true"}
    env.pop("RAY_ADDRESS")  # the repository variable is unset: the job starts its own cluster
    ran, failed = [], False
    for step in job["steps"]:
        if "run" not in step or step.get("id") == "install":  # actions and the install: this venv has them
            continue
        if not condition_holds(step.get("if"), env, failed):
            continue
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)
        ran.append((step["name"], proc.returncode, proc.stderr[-2000:]))
        failed = failed or proc.returncode != 0
    assert not failed, ran
    assert [name for name, *_ in ran] == ["Git identity for the experiment's commit", "Start a local cluster",
                                         "Run the experiment", "Report", "Push the experiment",
                                         "Stop the local cluster"]
    name = f"ci-{sha[:7]}"
    result = json.loads((project / "dvcray-result.json").read_text())
    assert result["status"] == "SUCCEEDED" and result["exp_name"] == name
    assert "test_acc" in json.dumps(result["metrics"]) or result["metrics"]
    text = summary.read_text()
    assert f"| {name} |" in text and "(baseline)" in text
    assert name in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=origin)
    assert not (isolated_env / ".dvcray" / "clusters" / "local.json").exists()  # the cluster went down
