"""The system of record's contract, run against both databases: SQLite (the embedded default)
and a real PostgreSQL server the tests start (tests/pg.py). Durability across a kill -9,
replicas following each other's appends, concurrent writers, the one-time import of a file log
written by the earlier code (torn tail included), schema versions."""
from __future__ import annotations

import threading

import pytest

from datastore.log import AppendLog
from datastore.storage import MIGRATIONS, open_storage
from router.core.errors import ConfigError
from tests.crash import killed_after_acks


def test_appends_are_replayed_in_order_after_a_reopen(db_url):
    st = open_storage(db_url)
    fb = st.stream("feedback")
    assert fb.replayed == []
    fb.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    st.stream("registry").append([{"id": "r"}])
    fb.append([{"id": "c", "v": "ünïcode ✓"}])
    st.close()
    again = open_storage(db_url)
    assert [r["id"] for r in again.stream("feedback").replayed] == ["a", "b", "c"]
    assert again.stream("feedback").replayed[2]["v"] == "ünïcode ✓"
    assert [r["id"] for r in again.stream("registry").replayed] == ["r"]
    again.close()


def test_a_replica_follows_what_another_appended(db_url):
    a, b = open_storage(db_url), open_storage(db_url)
    fa, fb = a.stream("feedback"), b.stream("feedback")
    assert fb.follow() == []
    fa.append([{"n": 1}, {"n": 2}])
    fb.append([{"n": 3}])                       # B's own: never handed back to B
    fa.append([{"n": 4}])
    assert [r["n"] for r in fb.follow()] == [1, 2, 4]
    assert [r["n"] for r in fa.follow()] == [3]
    assert fb.follow() == [] and fa.follow() == []
    a.stream("registry").append([{"n": 5}])     # another stream: not this one's
    assert fb.follow() == []
    a.close()
    b.close()


def test_concurrent_writers_lose_nothing_and_followers_see_each_once(db_url):
    handles = [open_storage(db_url) for _ in range(2)]
    watcher = open_storage(db_url)
    seen: list[int] = []
    stop = threading.Event()

    def follow():
        while not stop.is_set():
            seen.extend(r["n"] for r in watcher.stream("feedback").follow())
    t = threading.Thread(target=follow)
    t.start()

    def write(h, base):
        for i in range(40):
            h.stream("feedback").append([{"n": base + i}])
    writers = [threading.Thread(target=write, args=(handles[i % 2], 1000 * i)) for i in range(6)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    t.join(30)
    seen.extend(r["n"] for r in watcher.stream("feedback").follow())
    want = sorted(1000 * i + j for i in range(6) for j in range(40))
    assert sorted(seen) == want                                      # every one, exactly once
    assert sorted(r["n"] for r in open_storage(db_url).stream("feedback").replayed) == want
    for h in (*handles, watcher):
        h.close()


def test_an_acknowledged_append_survives_a_kill_9(db_url):
    acked = killed_after_acks(f"""
        from datastore.storage import open_storage
        s = open_storage({db_url!r}).stream("feedback")
    """, 's.append([{"n": i}])', at=150)
    got = [r["n"] for r in open_storage(db_url).stream("feedback").replayed]
    assert got[:acked + 1] == list(range(acked + 1))                 # every acknowledged one, in order


def test_a_file_log_of_the_earlier_code_is_imported_once_torn_tail_and_all(db_url, tmp_path):
    path = tmp_path / "state" / "feedback.log"
    old = AppendLog.open(path)
    old.append([{"id": f"r{i}", "scores": {"b": i / 10}} for i in range(7)])
    old.close()
    with open(path, "ab") as f:                                       # a write torn by a crash
        f.write(b'1a2b3c4d {"id": "torn", "sco')
    st = open_storage(db_url)

    def read(p):
        return AppendLog.open(p).replayed
    assert st.import_file_log("feedback", path, read) == 7
    assert st.import_file_log("feedback", path, read) == 0            # once
    assert st.import_file_log("feedback", path, read) == 0
    st.close()
    st = open_storage(db_url)
    assert [r["id"] for r in st.stream("feedback").replayed] == [f"r{i}" for i in range(7)]
    assert st.import_file_log("feedback", path, read) == 0
    st.close()


def test_the_schema_is_versioned_and_migrated_once(db_url):
    st = open_storage(db_url)
    st.close()
    st = open_storage(db_url)                       # a second open migrates nothing
    db = st.db
    rows = db.read("nothing", 0)
    assert rows == []
    if st.kind == "sqlite":
        (v,) = db._conn.execute("SELECT version FROM schema_version").fetchone()
        assert v == len(MIGRATIONS["sqlite"])
    st.close()


def test_bad_urls_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="must start with"):
        open_storage("mysql://x")
    with pytest.raises(ConfigError, match="cannot connect"):
        open_storage("postgresql://nobody:secret@127.0.0.1:1/db")
    try:
        open_storage("postgresql://nobody:secret@127.0.0.1:1/db")
    except ConfigError as e:
        assert "secret" not in str(e)


def test_an_imported_file_log_is_not_parsed_again(db_url, tmp_path):
    path = tmp_path / "feedback.log"
    old = AppendLog.open(path)
    old.append([{"id": "r0", "scores": {"b": 1.0}}])
    old.close()
    reads = []

    def read(p):
        reads.append(p)
        return AppendLog.open(p).replayed
    st = open_storage(db_url)
    assert st.import_file_log("feedback", path, read) == 1
    assert st.import_file_log("feedback", path, read) == 0
    st.close()
    assert open_storage(db_url).import_file_log("feedback", path, read) == 0
    assert len(reads) == 1                        # recognised by its hash, never parsed again
