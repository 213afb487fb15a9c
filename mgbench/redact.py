"""Passwords in URIs never leave the process: `postgresql://user:pass@host/db` is shown as `user:***@host`.

Every place that prints or writes a storage or tracking URI (dry runs, echo lines, trial.json, the spec
logged to MLflow, error messages) goes through `redact`; the real URI stays in memory for connecting.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"  # what a password is replaced by
# scheme://user:password@ - the password runs to the next `@` (an unencoded `/` or `:` in it is kept inside)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^@\s]*)@")


def mask_uri(text: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...` (every URI in the text)."""
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def redact(value: Any) -> Any:
    """A copy of a string, or of dicts/lists/tuples of them (keys too), with every URI password masked."""
    if isinstance(value, str):
        return mask_uri(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
