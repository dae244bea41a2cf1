"""The system of record: append-only streams of JSON records in a real database.

Everything caprouter learns or is told at run time is a record of a stream: ``feedback``
(outcomes sent with Feedback, and retractions), ``registry`` (onboarded backends), ``spend``
(what API keys spent). A stream is a ``RecordLog``: ``replayed`` (every record, in order, when it
was opened), ``append`` (durable when it returns: the transaction is committed) and ``follow``
(the records other processes appended since: how replicas sharing one database stay in step).

Two databases behind the same interface (``open_storage(url)``):

- SQLite (``sqlite:///path/caprouter.db``), the embedded default: one file in the state folder,
  WAL journal with ``synchronous=FULL``, so a commit is on disk when it returns. Several processes
  may share the file on one machine.
- PostgreSQL (``postgresql://...``, psycopg 3), shared by every replica. A commit is durable
  (``synchronous_commit`` on, the default).

Rows carry a sequence number (``seq``), and ``follow`` reads the rows of a stream above the
highest it has read. That needs a stream's rows to commit in ``seq`` order. SQLite has one writer
at a time. PostgreSQL draws sequence numbers at insert time, so two concurrent writers could
commit out of order and a follower would skip the late row for good; an insert into a stream
therefore takes the stream's transaction-scoped advisory lock first, so inserts into one stream
commit one after the other (they queue for the WAL flush anyway).

The schema is versioned (``schema_version``); ``migrate`` applies the steps a database lacks, in
one transaction, at open.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from router.core.errors import ArtifactError, ConfigError
from router.core.files import sha256_file

log = logging.getLogger(__name__)

# Schema steps, in order; a database at version v runs steps v.. (0-based).
MIGRATIONS: dict[str, list[list[str]]] = {
    "sqlite": [[
        "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, "
        "ts REAL NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX records_stream_seq ON records (stream, seq)",
    ]],
    "postgresql": [[
        "CREATE TABLE records (seq BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, "
        "ts DOUBLE PRECISION NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX records_stream_seq ON records (stream, seq)",
    ]],
}


class RecordLog(Protocol):
    """One stream of records. ``replayed``: what it held when opened, in order."""

    replayed: list[dict[str, Any]]

    def append(self, records: list[dict[str, Any]]) -> None:
        """Durable (committed) when it returns."""
        ...

    def follow(self) -> list[dict[str, Any]]:
        """Records other writers appended since the last call (or since the open), in order."""
        ...

    def close(self) -> None: ...


class _Db(Protocol):
    """What a database offers a stream: insert rows, read rows after a sequence number."""

    kind: str

    def insert(self, rows: Sequence[tuple[str, str]]) -> list[int]:
        """(stream, JSON body) rows in one transaction, committed when it returns; their seqs."""
        ...

    def read(self, stream: str, after: int) -> list[tuple[int, str]]: ...

    def close(self) -> None: ...


class Stream:
    """A RecordLog over one stream of a database."""

    def __init__(self, db: _Db, name: str) -> None:
        self.db, self.name = db, name
        self._lock = threading.Lock()
        rows = db.read(name, 0)
        self.replayed = [json.loads(b) for _, b in rows]
        self._last = rows[-1][0] if rows else 0     # the highest seq read
        self._mine: set[int] = set()                # seqs this handle appended above _last

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        rows = [(self.name, _dumps(r)) for r in records]
        # Under the lock with the insert: a follow between the commit and noting the seqs would
        # hand this handle its own rows back (applied twice: measured as one Feedback counted
        # twice until a restart).
        with self._lock:
            seqs = self.db.insert(rows)
            # Not _last: another writer's rows below these may not have been read yet.
            self._mine.update(seqs)

    def follow(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.read(self.name, self._last)
            if rows:
                self._last = rows[-1][0]
            fresh = [b for s, b in rows if s not in self._mine]
            self._mine = {s for s in self._mine if s > self._last}
        return [json.loads(b) for b in fresh]

    def close(self) -> None:
        pass                                           # the database belongs to the Storage


class _Sqlite:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, shared under a lock: SQLite allows one writer at a time anyway.
        self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'ed at every commit, so a commit that returned survives a
            # power cut (NORMAL would only survive a process crash).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=30000")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock from the start), committed or
        rolled back."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def migrate(self) -> int:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            have = row[0] if row else 0
            steps = MIGRATIONS["sqlite"]
            for step in steps[have:]:
                for stmt in step:
                    c.execute(stmt)
            if row is None:
                c.execute("INSERT INTO schema_version VALUES (?)", (len(steps),))
            else:
                c.execute("UPDATE schema_version SET version = ?", (len(steps),))
        return int(have)

    def insert(self, rows: Sequence[tuple[str, str]]) -> list[int]:
        now = time.time()
        with self._tx() as c:
            return [int(c.execute("INSERT INTO records (stream, ts, body) VALUES (?, ?, ?) RETURNING seq",
                                  (stream, now, b)).fetchone()[0]) for stream, b in rows]

    def read(self, stream: str, after: int) -> list[tuple[int, str]]:
        with self._lock:
            return [(int(s), b) for s, b in self._conn.execute(
                "SELECT seq, body FROM records WHERE stream = ? AND seq > ? ORDER BY seq", (stream, after))]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Postgres:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("storage.url is a PostgreSQL URL but psycopg is not installed "
                              "(pip install 'psycopg[binary]')") from None
        try:
            self._conn = psycopg.connect(url, autocommit=True)   # transactions are explicit: conn.transaction()
        except psycopg.OperationalError as e:
            raise ConfigError(f"cannot connect to PostgreSQL at {_redact(url)}: {str(e).strip()}") from None
        self._lock = threading.Lock()

    def migrate(self) -> int:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            # One migrator at a time across replicas starting together.
            cur.execute("SELECT pg_advisory_xact_lock(472517)")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            have = row[0] if row else 0
            steps = MIGRATIONS["postgresql"]
            for step in steps[have:]:
                for stmt in step:
                    cur.execute(stmt)
            if row is None:
                cur.execute("INSERT INTO schema_version VALUES (%s)", (len(steps),))
            else:
                cur.execute("UPDATE schema_version SET version = %s", (len(steps),))
        return int(have)

    def insert(self, rows: Sequence[tuple[str, str]]) -> list[int]:
        now = time.time()
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            # Inserts into one stream commit in seq order (see the module's docstring); streams
            # locked in one order, so two writers never wait on each other's locks.
            for stream in sorted({st for st, _ in rows}):
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (stream,))
            seqs = []
            for stream, b in rows:
                cur.execute("INSERT INTO records (stream, ts, body) VALUES (%s, %s, %s) RETURNING seq", (stream, now, b))
                row = cur.fetchone()
                assert row is not None
                seqs.append(int(row[0]))
        return seqs

    def read(self, stream: str, after: int) -> list[tuple[int, str]]:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT seq, body FROM records WHERE stream = %s AND seq > %s ORDER BY seq", (stream, after))
            return [(int(s), b) for s, b in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def _redact(url: str) -> str:
    """A database URL without its password (for messages and logs)."""
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@", 1)
    return url


class Storage:
    """One database: ``stream(name)`` opens a RecordLog over one of its streams."""

    def __init__(self, db: _Sqlite | _Postgres, url: str) -> None:
        self.db = db
        self.url = _redact(url)
        self.kind = db.kind
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._imported: set[tuple[Any, Any]] | None = None     # (stream, sha256) of file logs imported

    def stream(self, name: str) -> Stream:
        with self._lock:
            s = self._streams.get(name)
            if s is None:
                s = self._streams[name] = Stream(self.db, name)
            return s

    def import_file_log(self, name: str, path: Path, read: Callable[[Path], list[dict[str, Any]]]) -> int:
        """Copy a file log (``read`` returns its records, torn tail dropped) into stream ``name``
        once: the import is recorded in the ``imports`` stream with the file's content hash, in
        the same transaction as the records, and a second call does nothing. The file is left
        where it is. Returns the number of records imported."""
        if not path.exists():
            return 0
        # An imported file is recognised by its hash before it is parsed: an old feedback log can
        # hold hundreds of MB of embeddings, not worth reading at every start.
        if self._was_imported(name, sha256_file(path)):
            return 0
        records = read(path)        # drops a torn tail (truncating the file), which the hash must not see
        digest = sha256_file(path)
        if self._was_imported(name, digest):
            return 0
        marker = {"source": str(path.resolve()), "sha256": digest, "stream": name, "records": len(records)}
        self.db.insert([(name, _dumps(r)) for r in records] + [("imports", _dumps(marker))])
        with self._lock:
            assert self._imported is not None
            self._imported.add((name, digest))
        log.info("imported %d records of %s into the %s stream of %s", len(records), path, name, self.url)
        return len(records)

    def _was_imported(self, name: str, digest: str) -> bool:
        done = self.stream("imports")
        with self._lock:
            if self._imported is None:
                self._imported = {(r.get("stream"), r.get("sha256")) for r in done.replayed}
            self._imported.update((r.get("stream"), r.get("sha256")) for r in done.follow())
            return (name, digest) in self._imported

    def close(self) -> None:
        self.db.close()


def open_storage(url: str) -> Storage:
    """``sqlite:///abs/path.db`` (or ``sqlite:relative/path.db``) or ``postgresql://...``;
    the schema is migrated to the current version."""
    if url.startswith("sqlite:"):
        raw = url[len("sqlite:"):]
        path = Path(raw[2:] if raw.startswith("//") else raw)
        db: _Sqlite | _Postgres = _Sqlite(path)
    elif url.startswith(("postgresql://", "postgres://")):
        db = _Postgres(url)
    else:
        raise ConfigError(f"storage.url must start with sqlite: or postgresql://, got {_redact(url)!r}")
    try:
        was = db.migrate()
    except Exception as e:
        db.close()
        raise ArtifactError(f"cannot prepare the database {_redact(url)}: {e}") from None
    current = len(MIGRATIONS[db.kind])
    if was < current:
        log.info("storage %s: schema migrated from version %d to %d", _redact(url), was, current)
    return Storage(db, url)
