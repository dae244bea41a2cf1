"""A durable append-only log of JSON records.

Each record is one line: 8 hex digits of CRC-32 over the JSON bytes, a space, the JSON, "\n".
``append`` returns only after the bytes are fsync'ed, so an acknowledged record survives a kill -9
or a power cut. A crash mid-write leaves at most one torn record at the tail: ``open`` detects it
(no newline, or a CRC mismatch on the last line), truncates it away and reports it. A bad record
followed by good ones cannot come from a torn write, so it is refused as corruption instead of
being silently dropped.

Appends are group-committed. An fsync costs milliseconds and covers every byte written before it,
so taking one fsync per ``append`` under the write lock would make N concurrent writers (Feedback
calls) queue for N fsyncs in a row. Instead a writer holds the write lock only to write its
records, then waits for an fsync that covers them: if none is in flight it issues one itself,
covering everything written so far, and the writers who wrote in the meantime share the next one
(leader/follower, as in PostgreSQL's WAL flush). The guarantee is the same (``append`` returns
after an fsync covering its records; records lie in the order writers took the write lock); a
lone writer still pays one fsync per ``append``, and under load the number of fsyncs grows with
the rate of fsyncs the disk allows, not with the number of writers. If an fsync fails, every
writer it covered, or that wrote behind it, gets the error, and the log takes no more records
until reopened: the fsync is not retried, because after a failed fsync the kernel may have dropped
the dirty pages, so a later success would not prove they reached the disk.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router.core.errors import ArtifactError

log = logging.getLogger(__name__)


def _frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _unframe(line: bytes) -> dict[str, Any] | None:
    """The record of a complete line, or None when the line is damaged."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def encode_vector(v: npt.NDArray[np.float32]) -> str:
    """A float32 vector as base64 of its little-endian bytes: how embeddings travel in log records."""
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str, dim: int) -> npt.NDArray[np.float32]:
    """The inverse of ``encode_vector``; refuses a vector of another dimension."""
    v = np.frombuffer(base64.b64decode(s), dtype="<f4")
    if v.shape != (dim,):
        raise ArtifactError(f"stored embedding has {v.size} values, expected {dim}")
    return v.astype(np.float32)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AppendLog:
    """Open with ``AppendLog.open(path)``; ``replayed`` holds what was on disk; ``append`` durably.

    Safe to share between threads. ``appended`` counts the records this handle has made durable,
    ``syncs`` the fsyncs it has completed: ``appended / syncs`` is the mean size of a commit group.
    """

    def __init__(self, path: Path, replayed: list[dict[str, Any]], recovered_bytes: int) -> None:
        self.path = path
        self.replayed = replayed
        self.recovered_bytes = recovered_bytes
        self.appended = 0                   # records durable (covered by a completed fsync)
        self.syncs = 0                      # fsyncs completed
        # Unbuffered: a write reaches the kernel before the write lock is released (no Python
        # buffer to flush), so an fsync issued after it covers it.
        self._f = open(path, "ab", buffering=0)
        self._wlock = threading.Lock()      # the file's tail: one writer at a time, in order
        self._closed = False                # under _wlock, as are the two below
        self._written = 0                   # records written to the file (the leader reads it unlocked)
        self._broken: str | None = None     # why no more writes are taken, after a failed write or fsync
        self._sync = threading.Condition()  # guards the three below; never held during an fsync
        self._syncing = False               # an fsync is in flight (its issuer is the leader)
        self._synced = 0                    # records covered by a completed fsync
        self._sync_error: OSError | None = None

    @classmethod
    def open(cls, path: str | Path) -> AppendLog:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.touch()
            fsync_dir(p.parent)
        records, good_end, recovered = cls._scan(p)
        if recovered:
            log.warning("log %s: dropped a torn record of %d bytes at the tail", p, recovered)
            with open(p, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return cls(p, records, recovered)

    @staticmethod
    def _scan(p: Path) -> tuple[list[dict[str, Any]], int, int]:
        records: list[dict[str, Any]] = []
        data = p.read_bytes()
        offset = 0
        lines = data.splitlines(keepends=True)
        for i, line in enumerate(lines):
            rec = _unframe(line)
            if rec is None:
                if i == len(lines) - 1:
                    return records, offset, len(data) - offset
                raise ArtifactError(
                    f"{p}: record {i + 1} of {len(lines)} is damaged and is not the last one; "
                    "the log is corrupt (not a torn write). Move the file aside to start afresh.")
            records.append(rec)
            offset += len(line)
        return records, offset, 0

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write, then wait for an fsync that covers the write; when this returns the records are durable.

        Raises ArtifactError when the log is closed, or when the write or the fsync covering it
        failed (the records are then not acknowledged; they may or may not be found on reopening).
        """
        payload = memoryview(b"".join(_frame(r) for r in records))
        with self._wlock:
            if self._closed:
                raise ArtifactError(f"{self.path}: the log is closed; cannot append")
            if self._broken is not None:
                raise ArtifactError(f"{self.path}: {self._broken}; no more records are taken until the "
                                    "log is reopened (restart), which recovers what is durable")
            try:
                while payload:
                    payload = payload[self._f.write(payload):]
            except OSError as e:
                # At most a torn record at the tail: nothing may be written after it.
                self._broken = f"a write failed ({e})"
                raise ArtifactError(f"{self.path}: write failed: {e}") from e
            self._written += len(records)
            seq = self._written
        self._sync_to(seq)

    def _sync_to(self, seq: int) -> None:
        """Return once an fsync covering the first ``seq`` records written has completed.

        Group commit: a writer whose records no completed fsync covers waits while an fsync is in
        flight; then, if that one did not cover it either, it becomes the leader and fsyncs
        everything written so far, for itself and for all who wrote meanwhile. The lock is not
        held during the fsync, so the writers an fsync covers return as soon as it completes
        instead of queueing behind the next one.
        """
        if self._synced >= seq:             # covered by an fsync another writer did
            return
        with self._sync:
            while True:
                if self._synced >= seq:
                    return
                if self._sync_error is not None:
                    # Covered by the fsync that failed, or written behind it. Not retried: after a
                    # failed fsync, Linux may have dropped the dirty pages and cleared the error, so
                    # a later fsync that succeeds would prove nothing about them.
                    raise ArtifactError(f"{self.path}: fsync failed: {self._sync_error}") from self._sync_error
                if not self._syncing:
                    break
                self._sync.wait()
            if self._f.closed:              # unreachable: close() syncs what was written first
                raise ArtifactError(f"{self.path}: the log is closed; cannot append")
            self._syncing = True
            target = self._written          # every write completed so far, ours included
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            with self._wlock:
                self._broken = f"an fsync failed ({e})"
            with self._sync:
                self._sync_error = e
                self._syncing = False
                self._sync.notify_all()
            raise ArtifactError(f"{self.path}: fsync failed: {e}") from e
        except BaseException:
            with self._sync:
                self._syncing = False
                self._sync.notify_all()
            raise
        with self._sync:
            self.syncs += 1
            self.appended = self._synced = target
            self._syncing = False
            self._sync.notify_all()

    def follow(self) -> list[dict[str, Any]]:
        """Records other writers appended since: none; a file log has one writer (its process).
        (``datastore.storage.RecordLog``: the databases' streams are followed by replicas.)"""
        return []

    def close(self) -> None:
        """Refuse further appends, make what was written durable (the writers waiting for it are
        acknowledged), close the file. Idempotent."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
            written = self._written
        try:
            if self._sync_error is None:    # else the writers concerned have their error already
                self._sync_to(written)
        finally:
            with self._sync:
                while self._syncing:
                    self._sync.wait()
                self._f.close()
