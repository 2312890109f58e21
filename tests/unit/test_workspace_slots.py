"""Warm workspaces' slots (runs/workspaces.py): a slot whose run gave it back cleanly is
reset for the next run; one whose run was stopped, lost (a retry included) or killed
before it gave the slot back is cloned anew, its old clone moved out of the way."""

from __future__ import annotations

from pathlib import Path

from dvcray_cli.runs import workspaces

ROOT = "0" * 40


def fake_clone(slot: workspaces.Slot) -> None:
    """What a clone leaves that ``reusable`` looks at."""
    (slot.repo / ".git").mkdir(parents=True, exist_ok=True)
    (slot.repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def test_a_slot_given_back_cleanly_is_reset_by_the_next_run(tmp_path: Path):
    slot = workspaces.acquire(tmp_path, ROOT)
    assert workspaces.prepare(slot) is False  # nothing there yet: the run clones
    fake_clone(slot)
    workspaces.release(slot, slot.uses + 1, False)

    again = workspaces.acquire(tmp_path, ROOT)
    assert again.path == slot.path and again.uses == 1
    assert workspaces.prepare(again) is True
    workspaces.release(again, again.uses + 1, False)


def test_two_runs_at_once_never_share_a_slot(tmp_path: Path):
    first = workspaces.acquire(tmp_path, ROOT)
    second = workspaces.acquire(tmp_path, ROOT)
    assert first.path != second.path
    workspaces.release(second, 1, False)
    workspaces.release(first, 1, False)


def test_a_slot_whose_run_was_stopped_or_lost_is_cloned_anew(tmp_path: Path):
    slot = workspaces.acquire(tmp_path, ROOT)
    workspaces.prepare(slot)
    fake_clone(slot)
    (slot.repo / "half-done").write_text("a stage cut short")
    workspaces.release(slot, 1, True)  # the runner passes True for a stopped or lost run

    again = workspaces.acquire(tmp_path, ROOT)
    assert again.path == slot.path
    assert workspaces.prepare(again) is False
    assert not again.repo.exists(), "the old clone is gone before the new one is made"
    assert [p.name for p in again.path.parent.iterdir() if p.name.startswith("old-")] == []
    workspaces.release(again, 1, False)


def test_a_slot_whose_run_was_killed_before_giving_it_back_is_cloned_anew(tmp_path: Path):
    slot = workspaces.acquire(tmp_path, ROOT)
    workspaces.prepare(slot)
    fake_clone(slot)
    slot.lock.close()  # the runner died: the kernel drops its lock, release never ran

    again = workspaces.acquire(tmp_path, ROOT)
    assert again.path == slot.path and again.flagged
    assert workspaces.prepare(again) is False
    workspaces.release(again, 1, False)
    assert workspaces.acquire(tmp_path, ROOT).flagged is False
