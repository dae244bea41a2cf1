"""Structured logging: one JSON object a line (default for `serve`), or plain text."""
from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("decision_id", "backend", "rpc"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _ToListener(logging.handlers.QueueHandler):
    """A QueueHandler that knows the listener writing its lines (Python 3.12 has that built in)."""

    def __init__(self, lines: queue.SimpleQueue[logging.LogRecord], listener: logging.handlers.QueueListener) -> None:
        super().__init__(lines)
        self.listener = listener


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Log lines are formatted by the thread that logs and written by a listener thread (the
    standard library's QueueHandler / QueueListener, flushed at exit). Why: a write to stderr
    gives up the GIL, and under load the event loop then waits to get it back behind the batcher
    and the compute thread; each Route logs its decision."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, _ToListener):
            old.listener.stop()
            atexit.unregister(old.listener.stop)
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    to_queue = _ToListener(lines, logging.handlers.QueueListener(lines, handler))
    to_queue.listener.start()
    atexit.register(to_queue.listener.stop)
    root.handlers[:] = [to_queue]
    root.setLevel(level.upper())
    for noisy in ("transformers", "sentence_transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
