"""A run's log: teed to Ray's job log and to the store while it grows, and read back.

On the node (``LogTee``), every byte the runner and its stages write goes to
the job log (what ``dvcray run`` streams) and to a file, and what is new is
uploaded to the store once a second as a numbered piece
(``dvcray/runs/RUN_ID/log.parts/000001``), so the store holds the log as it
grows without rewriting it (uploads stay linear in the log's size). At the end
the whole file goes up once as ``log.txt``. A write that fails (a full disk)
never stops the draining of the stages' output: they never block on a pipe
nobody reads, and the log goes on in the job log and the store.

Anywhere (``StoreLog``), the log is read back from the store: ``log.txt`` once
it is there, else the pieces in order. A run that was retried has one log per attempt,
the first in the run's folder, the others in ``attempt-N/`` (``model.attempt_file``):
they are read one after the other, with a line between that says which attempt follows.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from dvcray_cli.runs.model import ATTEMPTS, HEARTBEAT_EVERY_S, LOG, LOG_PARTS, attempt_file
from dvcray_cli.service.protocol import attempts_of
from dvcray_cli.store import Store

UPLOAD_EVERY_S = 1.0
# What waits for upload stays below this; beyond it the oldest bytes are dropped
# (the job log and the local file still have them) and the store's copy says so.
MAX_PENDING = 64 * 2**20


class LogTee:
    """Send this process's fd 1 and 2 (and so every stage's output) to the job log,
    a file, and the store."""

    def __init__(self, path: Path, store: Store, run_id: str, prefix: str = "", attempt: int = 1) -> None:
        self.path, self.store, self.run_id, self.attempt = path, store, run_id, attempt
        # In a sweep, experiments share one job log: each line there starts
        # with "[NAME] ". The experiment's own log in the store stays plain.
        self.prefix = prefix.encode()
        self.partial = b""
        self.heartbeat: Callable[[], None] | None = None  # set by the runner: rewrites status.json
        self.pending = bytearray()
        self.lock = threading.Lock()
        self.beat_lock = threading.Lock()
        self.parts = 0
        self.file_error: str | None = None
        self.real_out = os.dup(1)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        try:
            self.file = open(path, "ab", buffering=0)
        except OSError as exc:
            self.file = None
            self.file_error = str(exc)
        self.reader = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        self.reader.start()
        self.stop_upload = threading.Event()
        self.uploader = threading.Thread(target=self._upload_loop, daemon=True)
        self.uploader.start()

    def _out(self, data: bytes) -> None:
        try:
            os.write(self.real_out, data)
        except OSError:
            pass  # the job log is gone (the supervisor died): the store still gets it

    def note(self, message: str) -> None:
        """A line of dvcray's own, in the job log and the store's copy alike."""
        line = f"dvcray: {message}\n".encode()
        self._keep(line)
        self._out(self.prefix + line if self.prefix else line)

    def _keep(self, chunk: bytes) -> None:
        if self.file is not None and self.file_error is None:
            try:
                self.file.write(chunk)
            except OSError as exc:
                self.file_error = str(exc)
                self._out(f"dvcray: the log file {self.path} cannot be written ({exc}); the log goes on "
                          "in the job log and the store.\n".encode())
        with self.lock:
            self.pending += chunk
            if len(self.pending) > MAX_PENDING:
                dropped = len(self.pending) - MAX_PENDING
                del self.pending[:dropped]
                self.pending[:0] = f"\n[dvcray: {dropped} bytes of log could not be uploaded in time]\n".encode()

    def _pump(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self._keep(chunk)
            if not self.prefix:
                self._out(chunk)
                continue
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            # One write per line: lines of experiments running at once do not interleave.
            for line in lines:
                self._out(self.prefix + line + b"\n")
        if self.partial:
            self._out(self.prefix + self.partial + b"\n")

    def upload(self) -> None:
        """Upload what is new as the next piece (nothing when nothing is new).

        Raises:
            StoreError: the store refused it (the bytes wait for the next try).
        """
        with self.lock:
            data = bytes(self.pending)
            self.pending.clear()
        if not data:
            return
        try:
            self.store.write(self.store.run_path(self.run_id, attempt_file(self.attempt,
                                                                           f"{LOG_PARTS}/{self.parts + 1:06d}")), data)
        except BaseException:
            with self.lock:
                self.pending[:0] = data
            raise
        self.parts += 1

    def _upload_loop(self) -> None:
        last_beat = time.time()
        failing = False
        while not self.stop_upload.wait(UPLOAD_EVERY_S):
            try:
                self.upload()
                failing = False
            except Exception as exc:  # keep running; the next try uploads what waits
                if not failing:
                    self._out(f"dvcray: log upload to the store failed, retrying: {exc}\n".encode())
                failing = True
            if self.heartbeat and time.time() - last_beat >= HEARTBEAT_EVERY_S:
                with self.beat_lock:
                    try:
                        if self.heartbeat:
                            self.heartbeat()
                        last_beat = time.time()
                    except Exception as exc:  # noqa: BLE001 - the next beat tries again
                        self._out(f"dvcray: heartbeat to the store failed: {exc}\n".encode())

    def stop_heartbeat(self) -> None:
        """No more heartbeats (the final status is about to be written); waits for one in flight."""
        with self.beat_lock:
            self.heartbeat = None

    def close(self) -> list[str]:
        """Stop teeing; upload what is left, then the whole log once.

        Returns:
            What could not be saved (empty when the store has the whole log).
        """
        sys.stdout.flush()
        sys.stderr.flush()
        # Closing our ends of the pipe lets the pump reach its end once the
        # stages' processes are gone too.
        os.dup2(self.real_out, 1)
        os.dup2(self.real_out, 2)
        self.reader.join(timeout=3)
        self.stop_upload.set()
        self.uploader.join(timeout=5)
        problems = []
        for attempt in range(3):
            try:
                self.upload()
                break
            except Exception as exc:  # noqa: BLE001 - reported, and retried
                if attempt == 2:
                    problems.append(f"the last lines of the log: {exc}")
                time.sleep(1.0 + attempt)
        if self.file is not None and self.file_error is None and not problems:
            try:
                self.store.upload(self.store.run_path(self.run_id, attempt_file(self.attempt, LOG)), self.path)
            except Exception as exc:  # noqa: BLE001 - the pieces hold it all the same
                problems.append(f"log.txt (the pieces hold the log): {exc}")
        return problems


class StoreLog:
    """A run's log as the store has it, read incrementally: each attempt's ``log.txt`` when
    its runner finished it, else the pieces uploaded so far (each read once); the attempts
    in order, with a line between them."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.pieces: dict[tuple[int, str], bytes] = {}
        self.whole: dict[int, bytes] = {}

    def read(self) -> bytes:
        """Everything there is so far."""
        tries = attempts_of((self.store.read_json(self.store.run_path(self.run_id, ATTEMPTS)) or {}).get("attempts"))
        numbers = sorted({1, *(a.number for a in tries)})
        text = b""
        for number in numbers:
            log = self._attempt(number)
            if number > 1:
                before = next((a for a in tries if a.number == number - 1), None)
                why = f" ({before.text()})" if before is not None and before.lost else ""
                text += (b"" if text.endswith(b"\n") or not text else b"\n") + \
                    f"----- dvcray: attempt {number}{why} -----\n".encode()
            text += log
        return text

    def _attempt(self, number: int) -> bytes:
        if number in self.whole:
            return self.whole[number]
        try:
            self.whole[number] = self.store.read(self.store.run_path(self.run_id, attempt_file(number, LOG)))
            return self.whole[number]
        except FileNotFoundError:
            pass
        for name in self.store.list(self.store.run_path(self.run_id, attempt_file(number, LOG_PARTS))):
            if (number, name) not in self.pieces and name.isdigit():
                try:
                    self.pieces[number, name] = self.store.read(
                        self.store.run_path(self.run_id, attempt_file(number, f"{LOG_PARTS}/{name}")))
                except FileNotFoundError:
                    break
        return b"".join(data for (n, _), data in sorted(self.pieces.items()) if n == number)
