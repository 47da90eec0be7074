"""Output-path checks that run before any compute (DESIGN habit 9: fail in seconds, not after training).

:func:`check_out_dir` and :func:`check_out_file` create nothing: they walk up to the nearest existing
ancestor and check that it is a writable folder, so a failed run leaves no empty folder behind and an
unwritable ``--out`` is reported before a model is compiled. A path under a regular file is caught even
for root (which ``os.access`` does not stop); the later write still reports any other ``OSError``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdjax.errors import OutputError


def _check_creatable(path: Path, flag: str) -> None:
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create {path}: {anc} is a file, not a folder; choose another {flag}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: {anc} is not writable; choose another {flag}")


def check_out_dir(path, flag: str = "--out") -> Path:
    """``path`` (absolute) if it is a writable folder or can be created as one; else :class:`OutputError`."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{path} is a file, not a folder; choose another {flag}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{path} is not writable; choose another {flag}")
        return path
    _check_creatable(path, flag)
    return path


def check_out_file(path, flag: str = "--out") -> Path:
    """``path`` (absolute) if a file can be written there (parents created as needed); else :class:`OutputError`."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputError(f"{path} is a folder; pass a file path for {flag}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path} is not writable; choose another {flag}")
        return path
    _check_creatable(path, flag)
    return path


__all__ = ["check_out_dir", "check_out_file"]
