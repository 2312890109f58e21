"""A run's stage environment, the pure parts: ``--env`` and the project's list parsed and
refused, ``PYTHONPATH`` carried relative to the project and mapped to the run's clone,
the runtime-env hook passing both to Ray workers, and a local head's environment built
from its allowlist (DESIGN.md, "The stage's environment")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dvcray_cli.clusters.local import head_environment
from dvcray_cli.errors import UsageError
from dvcray_cli.integrations.runtime_env import hook
from dvcray_cli.runs import stage_env
from dvcray_cli.runs.model import Manifest, RunRecord

# --------------------------------------------------------------------------- --env and the project's list


def test_env_takes_values_given_and_values_from_here_the_later_winning():
    environ = {"OMP_NUM_THREADS": "3", "SEED": "7", "PROJECT_WIDE": "x"}
    got = stage_env.parse(["MODE=fast", "OMP_NUM_THREADS", "SEED=1", "EMPTY="], listed=["PROJECT_WIDE", "SEED"],
                          environ=environ)
    assert got == {"PROJECT_WIDE": "x", "SEED": "1", "MODE": "fast", "OMP_NUM_THREADS": "3", "EMPTY": ""}
    assert stage_env.parse(["URL=http://h/?a=b"], environ={}) == {"URL": "http://h/?a=b"}, "split at the first ="


@pytest.mark.parametrize("name", ["GITHUB_TOKEN", "hf_token", "MY_SECRET_THING", "DB_PASSWORD", "PGPASSWD",
                                  "WANDB_API_KEY", "MINIO_ACCESS_KEY", "SSH_PRIVATE_KEY",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                                  "DVC_STUDIO_URL"])
def test_secret_like_names_are_refused_saying_how_nodes_get_credentials(name):
    for args in ({"specs": [f"{name}=planted-value"]}, {"specs": [name]}, {"specs": [], "listed": [name]}):
        with pytest.raises(UsageError) as caught:
            stage_env.parse(environ={name: "planted-value"}, **args)
        assert name in caught.value.message and "secret" in caught.value.message
        assert "planted-value" not in caught.value.message + caught.value.hint, "never the value"
        assert "store" in caught.value.message
        assert "~/.aws" in caught.value.hint and "instance profile" in caught.value.hint


@pytest.mark.parametrize("name", ["PYTHONPATH", "PATH", "HOME", "DVCRAY_WORKSPACE", "DVC_EXP_NAME", "RAY_ADDRESS",
                                  "RAY_RUNTIME_ENV_HOOK", "RAY_JOB_ID"])
def test_names_dvcray_dvc_or_ray_set_are_refused(name):
    with pytest.raises(UsageError) as caught:
        stage_env.parse([f"{name}=x"], environ={})
    assert name in caught.value.message and "does not carry it" in caught.value.message
    if name == "PYTHONPATH":
        assert "follows the project" in caught.value.message


def test_a_name_not_set_here_is_an_error_naming_it_and_where_it_came_from(tmp_path):
    with pytest.raises(UsageError) as caught:
        stage_env.parse(["NOT_SET_ANYWHERE"], environ={})
    assert "NOT_SET_ANYWHERE (--env) is not set here" in caught.value.message
    assert "--env NOT_SET_ANYWHERE=VALUE" in caught.value.hint
    listed_in = tmp_path / "pyproject.toml"
    with pytest.raises(UsageError) as caught:
        stage_env.parse([], listed=["OMP_NUM_THREADS"], environ={}, listed_in=listed_in)
    assert "OMP_NUM_THREADS" in caught.value.message and str(listed_in) in caught.value.message


@pytest.mark.parametrize("spec", ["1ABC=x", "A-B=x", "=x", "", "A B"])
def test_what_is_not_a_variable_name_is_refused(spec):
    with pytest.raises(UsageError, match="not a variable name"):
        stage_env.parse([spec], environ={})


def test_the_project_list_names_variables_and_never_holds_values():
    with pytest.raises(UsageError, match="values come from the machine"):
        stage_env.parse([], listed=["OMP_NUM_THREADS=4"], environ={"OMP_NUM_THREADS": "4"})
    with pytest.raises(UsageError, match="NUL"):
        stage_env.parse(["A=x\0y"], environ={})


# --------------------------------------------------------------------------- PYTHONPATH follows the project


def test_pythonpath_entries_inside_the_project_are_carried_relative_to_it(tmp_path):
    project = tmp_path / "project"
    (project / "src" / "lib").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    value = os.pathsep.join([str(project), "", str(project / "src" / "lib"), str(elsewhere), str(project) + "/",
                             "src", "/usr/lib/python3/dist-packages"])
    carried = stage_env.carry_pythonpath(value, project, cwd=project)
    assert carried.entries == [".", "src/lib", "src"]
    assert carried.left_out == [str(elsewhere), "/usr/lib/python3/dist-packages"]
    assert stage_env.carry_pythonpath(None, project, project) == stage_env.Carried()


def test_relative_entries_are_taken_from_where_dvcray_runs_and_links_are_resolved(tmp_path):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    link = tmp_path / "link-to-project"
    link.symlink_to(project)
    assert stage_env.carry_pythonpath("..", project, cwd=project / "sub").entries == ["."]
    assert stage_env.carry_pythonpath(str(link / "sub"), project, cwd=tmp_path).entries == ["sub"]
    assert stage_env.carry_pythonpath(str(project / "sub"), link, cwd=tmp_path).entries == ["sub"]
    outside = stage_env.carry_pythonpath("../..", project, cwd=project / "sub")
    assert outside.entries == [] and outside.left_out == ["../.."]


def test_an_entry_above_a_subdir_project_is_not_carried(tmp_path):
    """``dvc init --subdir``: the DVC project is what the stage and its workers get."""
    git_root = tmp_path / "repo"
    (git_root / "project").mkdir(parents=True)
    carried = stage_env.carry_pythonpath(str(git_root), git_root / "project", cwd=git_root)
    assert carried.entries == [] and carried.left_out == [str(git_root)]


def test_the_runner_maps_carried_entries_to_the_runs_own_clone_first(tmp_path):
    clone = tmp_path / "runs" / "r1" / "repo"
    job_dir = tmp_path / "ray" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    environ = {"PYTHONPATH": os.pathsep.join([str(job_dir), "/opt/site-lib"])}
    to_set, to_unset = stage_env.for_stage({"MODE": "fast", "OMP_NUM_THREADS": "2"}, [".", "src/lib"], clone,
                                           environ, job_dir)
    assert to_set["PYTHONPATH"].split(os.pathsep) == [str(clone), str(clone / "src" / "lib"), "/opt/site-lib"]
    assert to_set["MODE"] == "fast" and to_set["OMP_NUM_THREADS"] == "2"
    assert to_set["DVCRAY_ENV"] == "MODE,OMP_NUM_THREADS"
    assert to_set["DVCRAY_PYTHONPATH"] == os.pathsep.join([".", "src/lib"])
    assert to_unset == []


def test_the_runner_drops_what_a_manifest_should_not_hold(tmp_path):
    """A manifest is data: a name the client refuses or an entry leaving the project is dropped."""
    clone = tmp_path / "repo"
    to_set, to_unset = stage_env.for_stage(
        {"AWS_SECRET_ACCESS_KEY": "x", "PYTHONPATH": "/home/u/proj", "GOOD": "1", "BAD-NAME": "1", "N": 3},
        ["../../home/u/proj", "/home/u/proj", "", 7, "ok"], clone, {}, None)
    assert {k: v for k, v in to_set.items() if not k.startswith("DVCRAY_")} == {
        "GOOD": "1", "PYTHONPATH": str(clone / "ok")}
    assert to_set["DVCRAY_ENV"] == "GOOD" and to_set["DVCRAY_PYTHONPATH"] == "ok"
    nothing, unset = stage_env.for_stage({}, [], clone, {"PYTHONPATH": str(tmp_path / "pkg")}, tmp_path / "pkg")
    assert "PYTHONPATH" not in nothing and unset == ["PYTHONPATH"]
    assert nothing["DVCRAY_ENV"] == "" and nothing["DVCRAY_PYTHONPATH"] == ""


def test_the_manifest_and_record_keep_the_stage_env_and_read_it_tolerantly():
    manifest = Manifest(run_id="r", baseline="a" * 40, env={"MODE": "fast"}, pythonpath=[".", "src"])
    again = Manifest.from_json(manifest.to_json())
    assert again.env == {"MODE": "fast"} and again.pythonpath == [".", "src"]
    odd = Manifest.from_json({**manifest.to_json(), "env": {"A": 1, "B": "b"}, "pythonpath": "src"})
    assert odd.env == {"B": "b"} and odd.pythonpath == []
    assert Manifest.from_json({"run_id": "r", "baseline": "b"}).env == {}, "a manifest from before"
    record = RunRecord.from_json({**RunRecord("r", env=["MODE"]).to_json()})
    assert record.env == ["MODE"]
    assert RunRecord.from_json({"run_id": "r", "env": "MODE"}).env == []


# --------------------------------------------------------------------------- the hook gives workers the same


def test_the_hook_passes_the_runs_variables_and_pythonpath_to_workers(monkeypatch, tmp_path):
    monkeypatch.setenv("DVCRAY_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("DVCRAY_ENV", "MODE,OMP_NUM_THREADS")
    monkeypatch.setenv("DVCRAY_PYTHONPATH", os.pathsep.join([".", "src/lib"]))
    monkeypatch.setenv("MODE", "fast")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    env = hook({"env_vars": {"MODE": "the-stages-own"}})
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"]["MODE"] == "the-stages-own" and env["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in env["env_vars"], "only the names the run carries"
    assert "src/lib" in env["env_vars"]["PYTHONPATH"].split(os.pathsep)
    assert "." not in env["env_vars"]["PYTHONPATH"].split(os.pathsep), "the working_dir is on the path already"


# --------------------------------------------------------------------------- a local head's environment


def test_a_local_head_keeps_what_the_node_needs_and_nothing_of_the_shell_else(tmp_path):
    shell = {
        "PATH": "/usr/bin:/bin", "HOME": "/home/u", "USER": "u", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp/u", "XDG_CACHE_HOME": "/home/u/.cache", "HTTPS_PROXY": "http://proxy:3128",
        "AWS_PROFILE": "lab", "AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "RAY_USAGE_STATS_ENABLED": "0",
        "DVC_NO_ANALYTICS": "1", "DVCRAY_RUNNER_DIR": "/var/dvcray", "GIT_CONFIG_NOSYSTEM": "1",
        # What must not reach later runs from this shell:
        "PYTHONPATH": "/home/u/other-project", "CUDA_VISIBLE_DEVICES": "7", "OMP_NUM_THREADS": "1",
        "VIRTUAL_ENV": "/home/u/other-venv", "CONDA_PREFIX": "/opt/conda/envs/x", "GIT_AUTHOR_NAME": "someone",
        "DVC_STUDIO_TOKEN": "isat_x", "DVC_STUDIO_URL": "https://studio", "RAY_ADDRESS": "10.0.0.1:6379",
        "RAY_AUTH_TOKEN": "other", "DVCRAY_WORKSPACE": "/somewhere", "DVCRAY_ENV": "X", "CI": "true",
        "MY_PROJECT_SETTING": "1",
    }
    token = tmp_path / "auth_token"
    env = head_environment(shell, token, {"HOME": "/isolated", "EXTRA": "on purpose"}, python="/venv/bin/python")
    assert env["PATH"] == "/venv/bin" + os.pathsep + "/usr/bin:/bin"
    for kept in ("USER", "LANG", "LC_ALL", "TMPDIR", "XDG_CACHE_HOME", "HTTPS_PROXY", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "RAY_USAGE_STATS_ENABLED", "DVC_NO_ANALYTICS", "DVCRAY_RUNNER_DIR",
                 "GIT_CONFIG_NOSYSTEM"):
        assert env[kept] == shell[kept], kept
    assert env["HOME"] == "/isolated" and env["EXTRA"] == "on purpose", "what the caller sets wins"
    for dropped in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "VIRTUAL_ENV", "CONDA_PREFIX",
                    "GIT_AUTHOR_NAME", "DVC_STUDIO_TOKEN", "DVC_STUDIO_URL", "RAY_ADDRESS", "RAY_AUTH_TOKEN",
                    "DVCRAY_WORKSPACE", "DVCRAY_ENV", "CI", "MY_PROJECT_SETTING"):
        assert dropped not in env, dropped
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)


def test_a_local_head_runs_jobs_with_dvcrays_own_python(tmp_path):
    import sys

    env = head_environment({"PATH": "/usr/bin", "VIRTUAL_ENV": "/elsewhere"}, tmp_path / "t")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    if sys.prefix != sys.base_prefix:
        assert env["VIRTUAL_ENV"] == sys.prefix
    else:
        assert "VIRTUAL_ENV" not in env
