"""A local store (store.py): atomic writes, tolerant reads, URLs, the log's pieces.
S3 through moto: tests/func/test_run_s3.py."""

from __future__ import annotations

import json
import threading

import pytest

from dvcray_cli import store as store_mod
from dvcray_cli.errors import UsageError
from dvcray_cli.runs.logtee import StoreLog
from dvcray_cli.runs.model import LOG, LOG_PARTS


@pytest.fixture
def store(tmp_path):
    return store_mod.Store(str(tmp_path / "store"))


def test_a_reader_never_sees_a_half_written_record(store):
    """A local store used to truncate and then write (fsspec's pipe_file): a reader
    racing the runner's status.json rewrites got empty JSON and the client crashed
    (issue 10, item 8). Writes are a temp file and a rename now."""
    rel = store.run_path("r", "status.json")
    big = {"state": "RUNNING", "pad": "x" * 200_000}
    store.write(rel, json.dumps(big).encode())
    stop = threading.Event()
    bad = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.write(rel, json.dumps({**big, "i": i}).encode())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(400):
            data, problem = store.read_record(rel)
            if data is None:
                bad.append(problem)
    finally:
        stop.set()
        thread.join()
    assert bad == []


def test_torn_or_foreign_records_read_as_none_and_say_which_file(store):
    rel = store.run_path("r", "result.json")
    assert store.read_record(rel) == (None, None)
    for content in (b'{"run_id": "r", "sta', b"[1, 2]", b"\xff"):
        store.write(rel, content)
        data, problem = store.read_record(rel)
        assert data is None and problem == f"{rel} in the store {store.url} is not a JSON object"
        assert store.read_json(rel) is None


def test_uploads_are_atomic_too(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"a" * 1000)
    store.upload("x/y.bin", src)
    assert store.read("x/y.bin") == b"a" * 1000
    assert [p.name for p in (tmp_path / "store" / "x").iterdir()] == ["y.bin"]


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3:/bucket", "http://host/x", "s3://", "ftp:x"])
def test_a_store_url_that_is_not_s3_or_a_folder_is_refused(url):
    with pytest.raises(UsageError, match="store URL"):
        store_mod.resolve(url)


def test_folders_and_s3_urls_are_stores(tmp_path):
    assert store_mod.resolve(str(tmp_path / "s")).url == str(tmp_path / "s")
    assert store_mod.resolve("s3://bucket/prefix").url == "s3://bucket/prefix"


def test_the_log_reads_from_its_pieces_until_the_whole_log_is_there(store):
    log = StoreLog(store, "r")
    assert log.read() == b""
    store.write(store.run_path("r", f"{LOG_PARTS}/000001"), b"one\n")
    store.write(store.run_path("r", f"{LOG_PARTS}/000002"), b"two\n")
    assert log.read() == b"one\ntwo\n"
    store.write(store.run_path("r", f"{LOG_PARTS}/000003"), b"three\n")
    assert log.read() == b"one\ntwo\nthree\n"
    store.write(store.run_path("r", LOG), b"one\ntwo\nthree\n")
    assert log.read() == b"one\ntwo\nthree\n"
