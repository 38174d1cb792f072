"""Logging set-up shared by every process: plain text for people, JSON lines for log shippers."""

import json
import logging
import sys
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def reason(exc: BaseException, limit: int = 300) -> str:
    """An exception in one line: its type and message, whitespace collapsed (a timeout's empty message
    leaves the type alone, not "TimeoutError: ")."""
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:limit]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # bittensor logs through its own coloured console handler as well as through the root: each of its lines
    # (every refused request) came twice, and the coloured copy broke JSON logs. The root's handler alone.
    bittensor = logging.root.manager.loggerDict.get("bittensor")
    if isinstance(bittensor, logging.Logger):
        bittensor.handlers.clear()
    # Importing bittensor raises every logger that exists by then to CRITICAL: our own modules' warnings
    # (a refused artifact, an unavailable engine) would vanish. Ours follow the root level again.
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in OWN_PACKAGES:
            logging.getLogger(name).setLevel(logging.NOTSET)


OWN_PACKAGES = frozenset({"core", "miner", "workers", "synth_miner", "beat_schedule"})
