"""A snapshot too big for a Ray Job's package waits in the store (``backends/job.py`` puts
it there, with each file's sha256 in the manifest); the runner fetches it from there
before anything runs (``runner.main``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from dvcray_cli import files
from dvcray_cli.runs.model import MANIFEST, Manifest
from dvcray_cli.store import Store


def fetch(here: Path, manifest: Manifest, folder: Path, say: Callable[[str], None]) -> Path:
    """Fetch the snapshot ``manifest.parts`` names into ``folder`` (made 0700: the user's code
    and history), then remove it from the store: it served its one job. ``here``: the job's
    package, whose manifest is copied beside the files; ``say``: a line for the run's log.

    Only the files the manifest names, each checked against the sha256 it gives: the
    manifest came in the job's package, the files through the store, where anyone who
    writes to it could have changed them meanwhile (issue 20, point 2).

    Raises:
        RuntimeError: a file is missing or not what the client sent (nothing of it is used).
    """
    store = Store.from_json(manifest.store)
    files.private_dir(folder.parent)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    if not manifest.parts_sha256:
        raise RuntimeError(f"the snapshot in the store ({manifest.parts}) comes without the checksums of its "
                           "files: it is not used (a client of another dvcray version?)")
    for name, expected in sorted(manifest.parts_sha256.items()):
        store.download(f"{manifest.parts}/{name}", folder / name)
        if files.sha256_of(folder / name) != expected:
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"the snapshot's {name} in the store ({manifest.parts}) is not the file the client "
                               "sent (its sha256 differs): someone changed it in the store; nothing of it was used")
    shutil.copyfile(here / MANIFEST, folder / MANIFEST)
    try:
        store.delete(manifest.parts, recursive=True)
    except Exception as exc:  # noqa: BLE001 - a leftover in the store, said in the log
        say(f"could not remove the snapshot from the store ({manifest.parts}): {exc}")
    say(f"snapshot fetched from the store ({sum(p.stat().st_size for p in folder.iterdir()) / 2**20:.1f} MiB)")
    return folder
