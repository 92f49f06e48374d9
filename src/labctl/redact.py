"""Output hygiene, in one place: known secrets masked, control characters stripped, CSV cells neutralised.

Whatever labctl prints or logs that it did not write itself (cloud error bodies, setup output, profile and
roster text) passes through here. Credential loaders register the secret values they read; `mask` replaces
every registered value wherever it appears, so a cloud that echoes a request back cannot leak it.
"""

from __future__ import annotations

import re
import threading

MASK = "***"
# Secrets shorter than this are not registered: masking "a" or "12" everywhere would mangle output and hide
# nothing worth hiding (real keys and passwords are longer).
_MIN_SECRET_LEN = 6

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# C0 and C1 control characters and DEL, but not tab and newline: ESC sequences, bells, carriage returns that
# overwrite a line, OSC hyperlinks, ... none of them may reach a terminal from text labctl did not write.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def register_secret(value: str | bytes | None) -> None:
    """Remember a secret value (a password, key, token) so that `mask` hides it from now on."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value or len(value) < _MIN_SECRET_LEN:
        return
    global _pattern
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first, so a secret that contains another is masked whole.
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def mask(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


def strip_control(text: str, *, one_line: bool = False) -> str:
    """`text` without control characters (tab and newline kept unless `one_line`)."""
    return (_CONTROL_ONE_LINE if one_line else _CONTROL).sub("", text)


def clean(text: object, *, one_line: bool = False) -> str:
    """What may be shown to a person or written to a log: secrets masked, control characters gone."""
    return strip_control(mask(str(text)), one_line=one_line)


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula (OWASP: prefix = + - @ tab CR with a quote)."""
    text = clean("" if value is None else value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _reset_for_tests() -> None:
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None
