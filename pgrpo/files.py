"""Small file rules every command shares (torch-free, the grader image uses them too).

- Outputs are checked before any work: a path under a file, in a directory that does not exist, or in one we
  cannot write to stops the command with one sentence (exit 2) before it grades, extracts or trains anything.
  The check creates and removes a probe file, so it also catches read-only mounts (root passes `os.access`).
- Text inputs are read line by line as UTF-8, so a stray byte names its file and line instead of a traceback.
- Text outputs are written to a temp name and renamed (`write_text`).
"""
from __future__ import annotations

import os
import tempfile

from pgrpo.errors import UserError


def utf8_lines(path, what: str = "file") -> list[str]:
    """The lines of a UTF-8 text file (with their newlines); a bad byte -> UserError naming file:line."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: {what} cannot be read ({e.strerror})") from None
    lines = []
    for lineno, b in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{b[e.start]:02x} at column {e.start + 1}); "
                            f"save the {what} as UTF-8") from None
    return lines


def _probe(d: str, flag: str, path: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pgrpo-probe-", dir=d)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {d} ({e.strerror}).") from None
    os.close(fd)
    os.unlink(tmp)


def check_out_file(path, flag: str = "--out") -> str:
    """An output file's directory must exist and be writable; the path itself must not be a directory."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name.")
    if not os.path.isdir(d):
        parent = d
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory.")
        raise UserError(f"{flag} {path}: directory {d} does not exist (create it first).")
    _probe(d, flag, path)
    return path


def check_out_dir(path, flag: str = "--out") -> str:
    """An output directory may not exist yet (it is created with its parents), but it must not be a file, nor
    lie under one, and its nearest existing ancestor must be writable."""
    path = os.fspath(path)
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"{flag} {path} is a file, not a directory.")
    anc = p
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UserError(f"{flag} {path}: {anc} is a file, not a directory.")
    _probe(anc, flag, path)
    return path


def write_text(path, text: str) -> None:
    """Write a UTF-8 text file crash-safe: a temp name beside it, then an atomic rename (never a torn file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
