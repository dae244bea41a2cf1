import errno
import os
import threading
import time

import pytest

from datastore.log import AppendLog
from router.core.errors import ArtifactError


def test_append_and_reopen(tmp_path):
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    log.append([{"a": 1}, {"b": "ü"}])
    log.append([{"c": 3}])
    log.close()
    again = AppendLog.open(p)
    assert again.replayed == [{"a": 1}, {"b": "ü"}, {"c": 3}] and again.recovered_bytes == 0


@pytest.mark.parametrize("tail", [b"0000", b"deadbeef {\"x\": 1", b"00000000 {\"x\": 1}\n"])
def test_torn_tail_is_dropped_and_truncated(tmp_path, tail):
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    log.append([{"a": 1}])
    log.close()
    good = p.read_bytes()
    p.write_bytes(good + tail)
    again = AppendLog.open(p)
    assert again.replayed == [{"a": 1}] and again.recovered_bytes == len(tail)
    assert p.read_bytes() == good
    again.append([{"b": 2}])
    again.close()
    assert AppendLog.open(p).replayed == [{"a": 1}, {"b": 2}]


def test_damage_before_the_tail_is_refused(tmp_path):
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    log.append([{"a": 1}, {"b": 2}, {"c": 3}])
    log.close()
    lines = p.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"2", b"9")
    p.write_bytes(b"".join(lines))
    with pytest.raises(ArtifactError, match="corrupt"):
        AppendLog.open(p)


# ---- group commit: real threads, a real file ------------------------------------------------------
def _slow_fsync(monkeypatch, delay_s=0.005):
    """os.fsync that takes at least ``delay_s``, so that writers pile up behind one in flight."""
    real = os.fsync

    def slow(fd):
        time.sleep(delay_s)
        real(fd)

    monkeypatch.setattr("datastore.log.os.fsync", slow)


def _run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_concurrent_appends_share_fsyncs(tmp_path, monkeypatch):
    _slow_fsync(monkeypatch)
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    writers, per_writer = 16, 20
    start = threading.Barrier(writers)
    errors = []

    def writer(t):
        def run():
            try:
                start.wait()
                for n in range(per_writer):
                    log.append([{"t": t, "n": n}])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    _run_threads([writer(t) for t in range(writers)])
    assert not errors
    total = writers * per_writer
    assert log.appended == total
    assert 1 <= log.syncs <= total // 4      # serial: one fsync per append (about 40 here)
    log.close()
    replayed = AppendLog.open(p).replayed
    assert len(replayed) == total
    for t in range(writers):
        assert [r["n"] for r in replayed if r["t"] == t] == list(range(per_writer))


def test_lone_writer_fsyncs_once_per_append(tmp_path, monkeypatch):
    """Acknowledged = durable: each append returns after an fsync that saw its bytes."""
    p = tmp_path / "f.log"
    real, seen = os.fsync, []

    def recording(fd):
        seen.append(os.fstat(fd).st_size)
        real(fd)

    log = AppendLog.open(p)
    monkeypatch.setattr("datastore.log.os.fsync", recording)
    for i in range(5):
        log.append([{"i": i}, {"j": i}])
        assert seen[-1] == p.stat().st_size and len(seen) == i + 1
    assert log.syncs == 5 and log.appended == 10
    log.close()                              # nothing pending: no further fsync
    assert len(seen) == 5
    assert len(AppendLog.open(p).replayed) == 10


def test_failed_fsync_reaches_every_writer_it_covered(tmp_path, monkeypatch):
    """A holds the first fsync (which succeeds) until B, C and D have written; the next fsync,
    issued by one of them for all three, fails: all three get the error and none retries it."""
    p = tmp_path / "f.log"
    real, calls = os.fsync, []

    def lines():
        return p.read_bytes().count(b"\n")

    def scripted(fd):
        calls.append(fd)
        if len(calls) == 1:
            deadline = time.monotonic() + 5
            while lines() < 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            real(fd)
        elif len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        else:
            real(fd)

    log = AppendLog.open(p)
    monkeypatch.setattr("datastore.log.os.fsync", scripted)
    outcome = {}

    def writer(name):
        def run():
            try:
                log.append([{"w": name}])
                outcome[name] = "ok"
            except ArtifactError as e:
                outcome[name] = e
        return run

    a = threading.Thread(target=writer("a"))
    a.start()
    while not calls:                         # A is the leader, its fsync in flight
        time.sleep(0.001)
    _run_threads([writer(n) for n in "bcd"])
    a.join(timeout=10)
    assert outcome["a"] == "ok"
    for n in "bcd":
        assert isinstance(outcome[n], ArtifactError) and "fsync failed" in str(outcome[n])
        assert isinstance(outcome[n].__cause__, OSError) and outcome[n].__cause__.errno == errno.EIO
    assert len(calls) == 2 and log.syncs == 1 and log.appended == 1
    with pytest.raises(ArtifactError, match="fsync failed.*reopened"):
        log.append([{"w": "e"}])             # refused: nothing is written behind a failed fsync
    log.close()
    # Unacknowledged records may still be found on reopening (here the data did reach the file).
    again = AppendLog.open(p)
    assert [r["w"] for r in again.replayed][0] == "a" and len(again.replayed) == 4
    again.append([{"w": "f"}])               # a reopened log takes records again
    again.close()


def test_failed_write_leaves_only_a_torn_tail(tmp_path):
    """A write that fails halfway leaves a torn record; nothing is written after it, so reopening
    recovers every record before it."""
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    log.append([{"a": 1}])
    f = log._f

    class HalfThenFail:
        def write(self, b):
            f.write(bytes(b[: len(b) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(f, name)

    log._f = HalfThenFail()
    with pytest.raises(ArtifactError, match="write failed"):
        log.append([{"b": 2}])
    log._f = f
    with pytest.raises(ArtifactError, match="write failed.*reopened"):
        log.append([{"c": 3}])
    log.close()
    again = AppendLog.open(p)
    assert again.replayed == [{"a": 1}] and again.recovered_bytes > 0


def test_close_while_appending(tmp_path, monkeypatch):
    """Appends racing close either are acknowledged (and durable) or refused with ArtifactError."""
    _slow_fsync(monkeypatch, 0.002)
    p = tmp_path / "f.log"
    log = AppendLog.open(p)
    acked, refused, other = [], [], []

    def writer(t):
        def run():
            for n in range(1000):
                try:
                    log.append([{"t": t, "n": n}])
                except ArtifactError as e:
                    refused.append(str(e))
                    return
                except Exception as e:  # noqa: BLE001 - reported below
                    other.append(e)
                    return
                acked.append((t, n))
        return run

    threads = [threading.Thread(target=writer(t)) for t in range(8)]
    for t in threads:
        t.start()
    while len(acked) < 20:
        time.sleep(0.001)
    log.close()
    for t in threads:
        t.join(timeout=10)
    assert not other and len(refused) == 8 and all("closed" in m for m in refused)
    log.close()                              # idempotent
    with pytest.raises(ArtifactError, match="closed"):
        log.append([{"late": 1}])
    replayed = {(r["t"], r["n"]) for r in AppendLog.open(p).replayed}
    assert set(acked) <= replayed
