"""The store: where a run's outputs (through DVC) and records (``runs/RUN_ID/``) live.

A store is a DVC remote: ``s3://bucket/prefix`` or a local folder. Files are
reached through DVC's own filesystem classes (fsspec underneath), so an S3
store honours the same ``endpointurl``, region and credentials as ``dvc push``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dvcray_cli import files
from dvcray_cli.errors import StoreError, UsageError

REMOTE_NAME = "dvcray-store"
# Run records. Not "runs/": DVC keeps its run-cache there in every remote.
RUNS = "dvcray/runs"
# Snapshots too big for a Ray Job's package, on their way to a runner.
SNAPSHOTS = "dvcray/snapshots"
# Remote options that may travel to the cluster. Credentials never do: nodes
# use their own (the local environment, or an instance profile).
SHAREABLE = ("url", "endpointurl", "region", "use_ssl", "ssl_verify", "listobjects",
             "version_aware", "sse", "acl")


@dataclass
class Store:
    url: str
    options: dict[str, Any] = field(default_factory=dict)  # DVC remote options besides url
    secrets: dict[str, Any] = field(default_factory=dict, repr=False)  # client side only

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    def remote_config(self, with_secrets: bool = False) -> dict[str, Any]:
        """This store as a DVC remote section (``{"url": ..., ...}``)."""
        conf = {"url": self.url, **self.options}
        return {**conf, **self.secrets} if with_secrets else conf

    def dvc_config(self) -> dict[str, Any]:
        """An in-memory DVC config that makes this store the default remote."""
        return {"remote": {REMOTE_NAME: self.remote_config(with_secrets=True)},
                "core": {"remote": REMOTE_NAME}}

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Store":
        return cls(data["url"], dict(data.get("options") or {}))

    @cached_property
    def _fs(self):
        from dvc.fs import get_cloud_fs

        cls, conf, path = get_cloud_fs(None, **self.remote_config(with_secrets=True))
        return cls(**conf).fs, path

    def _path(self, rel: str) -> str:
        fs, root = self._fs
        return f"{root.rstrip('/')}/{rel}"

    def _call(self, what: str, func, *args):
        try:
            return func(*args)
        except FileNotFoundError:
            if what.startswith("write"):
                raise StoreError(f"Could not {what} in the store {self.url}: no such folder") from None
            raise
        except Exception as exc:
            raise StoreError(f"Could not {what} in the store {self.url}: {exc}",
                             "Check the store URL, your credentials and (for S3) the endpoint.") from exc

    def _put(self, rel: str, put) -> None:
        path = self._path(rel)

        def do() -> None:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            put(path)

        self._call(f"write {rel}", do)

    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` atomically: a reader sees the old bytes or the new,
        never a truncated file (a local store writes a temp file and renames it; on
        S3 it is one PUT)."""
        if self.is_local:
            self._put(rel, lambda path: files.write_bytes(Path(path), data, mode=0o644))
            return
        fs, _ = self._fs
        self._put(rel, lambda path: fs.pipe_file(path, data))

    def upload(self, rel: str, local: Path) -> None:
        """Copy the file ``local`` to ``rel``, atomically as ``write``."""
        if self.is_local:
            def copy(path: str) -> None:
                fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=os.path.dirname(path))
                os.close(fd)
                try:
                    shutil.copyfile(local, tmp)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise

            self._put(rel, copy)
            return
        fs, _ = self._fs
        self._put(rel, lambda path: fs.put_file(os.fspath(local), path))

    def read(self, rel: str) -> bytes:
        fs, _ = self._fs
        return self._call(f"read {rel}", fs.cat_file, self._path(rel))

    def read_json(self, rel: str) -> dict[str, Any] | None:
        """The JSON object at ``rel``; None while it is missing, torn or not an object."""
        return self.read_record(rel)[0]

    def read_record(self, rel: str) -> tuple[dict[str, Any] | None, str | None]:
        """The JSON object at ``rel`` and, when there is a file but no object in it,
        what is wrong with it (a record is data: it is never trusted to be valid).

        Returns:
            ``(object, None)``, ``(None, None)`` when there is no file, or
            ``(None, "REL in the store URL is not a JSON object")``.
        """
        try:
            data = self.read(rel)
        except FileNotFoundError:
            return None, None
        found = files.parse_json_object(data)
        if found is None:
            return None, f"{rel} in the store {self.url} is not a JSON object"
        return found, None

    def list(self, rel: str) -> list[str]:
        """The names in the folder ``rel``, sorted; empty when there is none."""
        fs, _ = self._fs
        try:
            entries = fs.ls(self._path(rel), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StoreError(f"Could not list {rel} in the store {self.url}: {exc}") from exc
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, rel: str) -> bool:
        fs, _ = self._fs
        return bool(self._call(f"look up {rel}", fs.exists, self._path(rel)))

    def download(self, rel: str, local: Path) -> None:
        fs, _ = self._fs
        self._call(f"read {rel}", fs.get_file, self._path(rel), os.fspath(local))

    def delete(self, rel: str, recursive: bool = False) -> None:
        fs, _ = self._fs
        self._call(f"delete {rel}", lambda path: fs.rm(path, recursive=recursive), self._path(rel))

    def run_ids(self) -> list[str]:
        """Every run recorded in the store (newest first by id)."""
        return sorted((n for n in self.list(RUNS) if not n.startswith(".")), reverse=True)

    def run_path(self, run_id: str, name: str) -> str:
        return f"{RUNS}/{run_id}/{name}"

    def check_writable(self) -> None:
        """Write and delete a small file, so a bad store fails before a run starts."""
        probe = f"{RUNS}/.write-check-{os.getpid()}"
        try:
            self.write(probe, b"ok")
            self.delete(probe)
        except StoreError as exc:
            raise StoreError(f"Cannot write to the store {self.url}: {exc.__cause__ or exc}",
                             "Pass --store with a folder or s3:// URL you can write to.") from None


def resolve(explicit: str | None, repo=None) -> Store:
    """The store a run uses: ``--store``, else the DVC default remote when it is
    on S3, else ``~/.dvcray/store``.

    ``repo`` is an open ``dvc.repo.Repo`` (or None outside a DVC project).
    """
    remotes: dict[str, dict] = dict(repo.config.get("remote", {})) if repo else {}
    if explicit:
        _check_url(explicit)
        url = explicit if "://" in explicit else os.path.abspath(os.path.expanduser(explicit))
        for conf in remotes.values():
            if conf.get("url", "").rstrip("/") == url.rstrip("/"):
                return _from_remote(conf)
        if "://" in url and not url.startswith("s3://"):
            raise UsageError(f"Unsupported store URL {explicit}.",
                             "Use s3://bucket/prefix or a local folder.")
        return Store(url)
    default = repo.config.get("core", {}).get("remote") if repo else None
    if default and default in remotes and str(remotes[default].get("url", "")).startswith("s3://"):
        return _from_remote(remotes[default])
    return Store(os.fspath(files.default_store_dir()))


def _check_url(text: str) -> None:
    """A store is ``s3://bucket[/prefix]`` or a folder; anything that looks like
    another URL (``gs://``, ``s3:/bucket``, ``http:...``) is refused, not taken
    for a folder name."""
    import re

    if text.startswith("s3://"):
        if not text[len("s3://"):].split("/", 1)[0]:
            raise UsageError(f"The store URL {text} names no bucket.", "Use s3://bucket/prefix.")
        return
    if "://" in text or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text):
        raise UsageError(f"Unsupported store URL {text}.", "Use s3://bucket/prefix or a local folder.")


def from_record(data: dict[str, Any], repo=None) -> Store:
    """The store a run record names (``Store.to_json()``, which has no secrets),
    with the options and secrets of the user's DVC remote of the same URL, if any."""
    remotes: dict[str, dict] = dict(repo.config.get("remote", {})) if repo else {}
    url = str(data["url"]).rstrip("/")
    for conf in remotes.values():
        if str(conf.get("url", "")).rstrip("/") == url:
            return _from_remote(conf)
    return Store.from_json(data)


def _from_remote(conf: dict[str, Any]) -> Store:
    options = {k: v for k, v in conf.items() if k in SHAREABLE and k != "url"}
    secrets = {k: v for k, v in conf.items() if k not in SHAREABLE}
    return Store(conf["url"], options, secrets)
