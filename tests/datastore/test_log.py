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
