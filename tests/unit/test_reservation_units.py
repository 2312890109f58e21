"""The pure parts of an experiment's reservation around its stage's Ray work
(integrations/reservation.py): what it holds, the check that a Ray library's request fits,
and patching a module when it is imported. The real thing: func/test_reservation.py."""

from __future__ import annotations

import json
import sys

import pytest

from dvcray_cli.integrations import reservation


def test_outside_a_reservation_nothing_is_reserved(monkeypatch):
    monkeypatch.delenv(reservation.RESERVATION_VAR, raising=False)
    monkeypatch.delenv(reservation.SHAPE_VAR, raising=False)
    assert reservation.reserved() is None and reservation.shape() == {} and reservation.env_vars() == {}
    reservation.setup()  # a worker of a run without one: nothing happens


def test_the_shape_is_cpus_and_gpus_and_tolerates_garbage(monkeypatch):
    monkeypatch.setenv(reservation.RESERVATION_VAR, "ab" * 18)
    monkeypatch.setenv(reservation.SHAPE_VAR, json.dumps({"CPU": 2, "GPU": 1, "node:__internal_head__": 0.001,
                                                          "bad": "x"}))
    assert reservation.shape() == {"CPU": 2.0, "GPU": 1.0}
    assert set(reservation.env_vars()) == {reservation.RESERVATION_VAR, reservation.SHAPE_VAR}
    monkeypatch.setenv(reservation.SHAPE_VAR, "{not json")
    assert reservation.shape() == {}


def test_a_worker_group_larger_than_the_reservation_is_refused_naming_both():
    reservation.check_fits([{"CPU": 1}, {"CPU": 1}], {"CPU": 2.0}, "Ray Train's worker group")
    with pytest.raises(RuntimeError, match=r"asks for 3 CPU at once, but the experiment reserved 2 CPU"):
        reservation.check_fits([{"CPU": 1}] * 3, {"CPU": 2.0}, "Ray Train's worker group")
    with pytest.raises(RuntimeError, match=r"1 GPU .* reserved 0 GPU"):
        reservation.check_fits([{"CPU": 1, "GPU": 1}], {"CPU": 4.0}, "Ray Train's worker group")


def test_a_module_imported_later_is_patched_as_it_loads(tmp_path, monkeypatch):
    (tmp_path / "dvcray_patch_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def patch(module):
        seen.append(module.VALUE)
        module.VALUE = 2

    try:
        reservation.when_imported("dvcray_patch_probe", patch)
        reservation.when_imported("dvcray_patch_probe", patch)  # once is enough
        import dvcray_patch_probe

        assert dvcray_patch_probe.VALUE == 2 and seen == [1]
        reservation.when_imported("dvcray_patch_probe", patch)  # already loaded: patched at once
        assert seen == [1, 2]
    finally:
        sys.modules.pop("dvcray_patch_probe", None)
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "name", None) != "dvcray_patch_probe"]
