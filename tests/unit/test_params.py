"""-S overrides checked with DVC's own parser (params.py), against params files on disk."""

from __future__ import annotations

import pytest

from dvcray_cli import params
from dvcray_cli.errors import UsageError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n  epochs: 3\nseed: 0\n")
    (tmp_path / "other.yaml").write_text("depth: 2\n")
    return tmp_path


def test_good_overrides_are_grouped_by_file(root):
    grouped = params.check(root, ["train.lr=0.5", "other.yaml:depth=4", "+new=1", "~seed"])
    assert grouped == {"params.yaml": ["train.lr=0.5", "+new=1", "~seed"], "other.yaml": ["depth=4"]}
    assert (root / "params.yaml").read_text().startswith("train:\n  lr: 0.1")  # nothing written


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "Unknown parameter 'train.lrr' in params.yaml"),
    (["missing.yaml:a=1"], "names params file 'missing.yaml', which does not exist"),
    (["=3"], "a KEY is missing"),
    (["train.lr=[1,"], "Bad -S value"),
])
def test_bad_overrides_are_usage_errors_that_name_the_problem(root, overrides, message):
    with pytest.raises(UsageError) as info:
        params.check(root, overrides)
    assert message in info.value.message and info.value.exit_code == 2


def test_sweeps_are_recognised_and_their_keys_checked(root):
    assert params.is_sweep(["train.lr=0.1,0.2"]) and params.is_sweep(["seed=range(0,3)"])
    assert not params.is_sweep(["train.lr=0.1"]) and not params.is_sweep([])
    with pytest.raises(UsageError, match="Unknown parameter 'nope'"):
        params.check(root, ["nope=1,2"])


def test_apply_writes_checked_overrides(root):
    params.apply(root, params.check(root, ["train.epochs=9"]))
    assert "epochs: 9" in (root / "params.yaml").read_text()


def test_the_keys_overrides_set_are_read_with_dvcs_parser():
    sets = ["train.lr=0.5", "other.yaml:depth=4", "+new=1", "++forced=2", "~seed", "note='a=b'"]
    assert params.keys(sets) == {"train.lr", "depth", "new", "forced", "seed", "note"}
    assert params.keys([]) == set()
