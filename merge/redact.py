"""Keep Hugging Face tokens out of everything Suture shows or writes: log records and error lines.

HTTP libraries log raw response headers at DEBUG (a server that echoes the ``Authorization`` header would
put the token in `suture ... -v` output), and exception texts can quote a request. So the transport
loggers are held at WARNING, and a :class:`logging.Filter` on the output handlers replaces every known
token (``HF_TOKEN``, the saved login, tokens registered by the code that used them), every
``Authorization: Bearer ...`` value and every ``hf_...``-shaped string with ``***`` before a record is
formatted.
"""

from __future__ import annotations

import logging
import os
import re
import threading

#: Loggers of the HTTP stack that print request/response headers at DEBUG.
TRANSPORT_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "requests", "hpack", "h2", "h11")

MASK = "***"
_SHAPES = (
    # an Authorization header's value, whatever the scheme (also as httpcore's bytes tuples: b'authorization', b'...')
    re.compile(r"(?i)(authorization['\"]?\s*[:,=]\s*(?:b?['\"])?)[^'\"\r\n,;)\]}]+"),
    re.compile(r"(?i)\b(bearer)(\s+)[^\s'\",;)\]}]+"),
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),  # the shape of Hugging Face user/org tokens
    re.compile(r"\bapi_org_[A-Za-z0-9]{8,}"),
)
_ENV_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_lock = threading.Lock()
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a token this process uses, so that every later log record and error line masks it."""
    if value and len(value.strip()) >= 4:
        with _lock:
            _registered.add(value.strip())


def known_secrets() -> list[str]:
    """Tokens to mask: registered ones and those in the environment now (longest first)."""
    found = set(_registered)
    for name in _ENV_TOKENS:
        value = os.environ.get(name, "").strip()
        if len(value) >= 4:
            found.add(value)
    return sorted(found, key=len, reverse=True)


def redact(text: str, extra: str | None = None) -> str:
    """`text` with every known token, bearer value and token-shaped string replaced by ``***``."""
    if not text:
        return text
    secrets = known_secrets() + ([extra] if extra else [])
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = _SHAPES[0].sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _SHAPES[1].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    for shape in _SHAPES[2:]:
        text = shape.sub(MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments merged in) and its traceback text with tokens masked."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - the logging API's name
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logging's problem; show the raw parts masked
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Quiet the transport loggers below WARNING and mask tokens on every handler that prints records.

    Call after the handlers exist (e.g. after ``logging.basicConfig``); calling again is harmless.
    """
    for name in TRANSPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # the login token, read once now (reading the file for every record would be slow)
        from huggingface_hub import get_token

        register_secret(get_token())
    except Exception:  # no huggingface_hub, or an unreadable token file: nothing to register
        pass
    # huggingface_hub prints through its own handler too; cover it, the root's, and the handler logging
    # falls back to when no handler is configured (as under Streamlit)
    handlers = [h for name in ("", "huggingface_hub") for h in logging.getLogger(name).handlers]
    for handler in [*handlers, logging.lastResort]:
        if handler is not None and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


__all__ = ["TRANSPORT_LOGGERS", "register_secret", "known_secrets", "redact", "RedactingFilter", "install_log_redaction"]
