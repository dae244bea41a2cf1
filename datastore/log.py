"""A durable append-only log of JSON records.

Each record is one line: 8 hex digits of CRC-32 over the JSON bytes, a space, the JSON, "\n".
``append`` returns only after the bytes are fsync'ed, so an acknowledged record survives a kill -9
or a power cut. A crash mid-write leaves at most one torn record at the tail: ``open`` detects it
(no newline, or a CRC mismatch on the last line), truncates it away and reports it. A bad record
followed by good ones cannot come from a torn write, so it is refused as corruption instead of
being silently dropped.
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
    """Open with ``AppendLog.open(path)``; ``replayed`` holds what was on disk; ``append`` durably."""

    def __init__(self, path: Path, replayed: list[dict[str, Any]], recovered_bytes: int) -> None:
        self.path = path
        self.replayed = replayed
        self.appended = 0
        self.recovered_bytes = recovered_bytes
        self._lock = threading.Lock()
        self._f = open(path, "ab")

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
        """Write and fsync; when this returns the records are durable."""
        payload = b"".join(_frame(r) for r in records)
        with self._lock:
            self._f.write(payload)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.appended += len(records)

    def close(self) -> None:
        with self._lock:
            self._f.close()
