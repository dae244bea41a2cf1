"""The composition root's system of record: SQLite in the state folder by default, and the file
logs of the earlier version imported into it once."""
from __future__ import annotations

from datastore.log import AppendLog
from router.core.config import AppConfig
from router.serving.app import open_system_of_record, storage_url
from router.serving.registrations import log_path


def test_the_earlier_file_logs_are_imported_once(tmp_path):
    state = tmp_path / "state"
    cfg = AppConfig.model_validate({"datastore": {"state_dir": str(state)},
                                    "auth": {"keys_file": str(tmp_path / "auth" / "keys.json")}})
    assert storage_url(cfg) == f"sqlite:///{(state / 'caprouter.db').resolve()}"
    for path, records in ((state / "feedback.log", [{"id": f"f{i}", "scores": {"b": 1.0}} for i in range(5)]),
                          (log_path(state), [{"op": "onboard", "id": "r1"}]),
                          (tmp_path / "auth" / "spend.log", [{"key": "k", "period": "d2026-12-02", "cost": 2.0}])):
        log = AppendLog.open(path)
        log.append(records)
        log.close()
    for _ in range(2):                                   # a restart imports nothing twice
        st = open_system_of_record(cfg)
        assert [r["id"] for r in st.stream("feedback").replayed] == [f"f{i}" for i in range(5)]
        assert [r["id"] for r in st.stream("registry").replayed] == ["r1"]
        assert st.stream("spend").replayed[0]["cost"] == 2.0
        st.close()
    assert (state / "feedback.log").exists()             # left where it was
    cfg2 = AppConfig.model_validate({"storage": {"url": "postgresql://h/db"}})
    assert storage_url(cfg2) == "postgresql://h/db"
