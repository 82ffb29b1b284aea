"""Observe which files this process opens, with an audit hook on Python's `open` event.

Audit hooks cannot be removed, so the hook is installed once and records only inside `recorded_opens()`.
Files read by the pack all go through Python's `open` (tokenizers and SentencePiece get bytes the pack read)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_active: list[list[Path]] = []
_installed = False


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _active and isinstance(args[0], (str, bytes, os.PathLike)):
        path = Path(os.path.realpath(os.fsdecode(args[0])))
        for opened in _active:
            opened.append(path)


@contextmanager
def recorded_opens() -> Iterator[list[Path]]:
    """The resolved paths of every file opened (by any thread) while the block runs."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    opened: list[Path] = []
    _active.append(opened)
    try:
        yield opened
    finally:
        _active.remove(opened)


def outside(opened: list[Path], *roots: Path) -> list[Path]:
    """The opened files that lie outside every root (Python's own modules and /proc excluded)."""
    real = [Path(os.path.realpath(r)) for r in roots]
    skip = (Path(sys.prefix), Path(sys.base_prefix), Path("/proc"), Path("/dev"))
    return [p for p in opened if p.suffix not in (".py", ".pyc", ".so")
            and not any(p.is_relative_to(r) for r in (*real, *skip))]
