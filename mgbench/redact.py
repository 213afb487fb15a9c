"""Passwords in URIs never leave the process: `postgresql://user:pass@host/db` is shown as `user:***@host`.

Every place that prints or writes a storage or tracking URI (dry runs, echo lines, trial.json, the spec
logged to MLflow, error messages) goes through `redact`; the real URI stays in memory for connecting.
A pickled study spec (submitit's job pickles) holds masked URIs: `stash_uri` parks the real one in the
environment, which child processes and SLURM jobs inherit (sbatch exports it) and `ps` does not show.
"""
from __future__ import annotations

import hashlib
import os
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


STASH_PREFIX = "MGBENCH_URI_"  # environment variables holding real URIs, named by a hash of the masked form


def _stash_name(masked: str) -> str:
    return STASH_PREFIX + hashlib.sha256(masked.encode()).hexdigest()[:16].upper()


def stash_uri(uri: str) -> str:
    """The URI with its password masked; the real URI goes into os.environ (inherited by jobs started later)."""
    masked = mask_uri(uri)
    if masked != uri:
        os.environ[_stash_name(masked)] = uri
    return masked


def unstash_uri(uri: str) -> str:
    """The real URI behind a masked one, from the environment (unchanged when there is none)."""
    return os.environ.get(_stash_name(uri), uri) if f":{MASK}@" in uri else uri
