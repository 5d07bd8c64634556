"""The one JSONL reader/writer (batch manifests, POPE answers.jsonl).

Rows are appended one ``write`` each, flushed and fsynced, so a crash or a power cut loses at most
the row being written: a torn last line (no newline after it). Readers drop exactly that line, with a
note, and refuse any other malformed line with ``path:line``. Writers cut a torn last line off before
they append, so it never ends up in the middle of the file.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _torn_tail(data: bytes) -> int:
    """Length of the torn last line of ``data`` (0 if it ends with a newline or the last line is whole JSON)."""
    if not data or data.endswith(b"\n") or b"\n" not in data:
        return 0       # (no newline at all: not a torn append to rows of ours, so it must parse whole)
    tail = data[data.rfind(b"\n") + 1:]
    try:
        json.loads(tail)
        return 0       # complete, only its newline is missing
    except ValueError:
        return len(tail)


def read(path, check=None, *, quiet: bool = False) -> list[dict]:
    """Every row of ``path`` (blank lines skipped). ``check(row)`` returns an error text for a row
    that is JSON but not a valid row of this file (or None). A torn last line is dropped with a note
    on stderr (``quiet``: no note); any other bad line raises UserError ``path:line: ...``."""
    path = Path(path)
    data = path.read_bytes()
    torn = _torn_tail(data)
    if torn and not quiet:
        print(f"note: {path}: ignored a torn last line (an interrupted write)", file=sys.stderr)
    return _rows(path, data[:len(data) - torn], check)


def _rows(path: Path, data: bytes, check) -> list[dict]:
    rows = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({getattr(e, 'msg', e)})")
        problem = "not a JSON object" if not isinstance(row, dict) else (check(row) if check else None)
        if problem:
            raise UserError(f"{path}:{n}: {problem}")
        rows.append(row)
    return rows


class Writer:
    """Append rows to a JSONL file: one write per row, flushed and fsynced before ``append`` returns.

    Opening cuts a torn last line off (and ends a whole last line that lacks its newline);
    ``truncate=True`` starts the file afresh. ``lock=True`` takes an exclusive ``fcntl`` lock on the
    file for the writer's lifetime, or raises UserError when another process holds it. ``check(row)``
    (as for :func:`read`): before anything is cut, truncated or appended, every row already in the
    file must pass it, else UserError and the file is left as it was (it is not ours).
    """

    def __init__(self, path, truncate: bool = False, lock: bool = False, busy: str | None = None, check=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()
        self.file = open(self.path, "a+b")   # never truncates before the lock is held
        try:
            if lock:
                import fcntl
                try:
                    fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(busy or f"{self.path} is in use by another process") from None
            self.file.seek(0)
            data = self.file.read()
            torn = _torn_tail(data)
            if check is not None:
                try:
                    _rows(self.path, data[:len(data) - torn], check)
                except UserError as e:
                    raise UserError(f"{e}; {self.path} was not written by smolattn, so it is left untouched: "
                                    "choose another output folder") from None
            if truncate:
                self.file.truncate(0)
            else:
                if torn:
                    self.file.truncate(len(data) - torn)
                elif data and not data.endswith(b"\n"):
                    self.file.write(b"\n")
            self._sync()
        except BaseException:
            self.file.close()
            raise

    def _sync(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, row: dict) -> None:
        self.file.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        self._sync()

    def truncate(self) -> None:
        """Start the file afresh (the lock stays held)."""
        self.file.truncate(0)
        self._sync()

    def close(self) -> None:
        self.file.close()     # releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
