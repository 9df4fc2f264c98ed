"""One line per event, text or JSON, with addresses and secrets redacted by default."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_ADDRESS = re.compile(r"([A-Za-z0-9._%+=-])[A-Za-z0-9._%+=-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_SECRETISH = re.compile(r"(?i)\b(password|passwd|secret|token)=\S+")


def redact(text: str) -> str:
    """Hide the local part of every address and the value of anything named like a secret."""
    text = _ADDRESS.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    return _SECRETISH.sub(lambda m: f"{m.group(1)}=***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def setup(*, level: str, json_lines: bool, redact_addresses: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if redact_addresses:
        handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiosmtpd").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
