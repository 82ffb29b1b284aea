"""Containment: every file the loaders open must lie, after resolving links, inside an allowed root."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import EllaLoadError

Roots = Sequence[Path]


def contained(path: Path, roots: Roots, entry: str | None = None) -> Path:
    """`path` if it resolves (links followed) inside one of `roots`; else an EllaLoadError naming the file,
    the `entry` (e.g. an index's weight_map value, a refs/main revision) that led there, and the roots.
    Nothing is opened: only the path is resolved."""
    try:
        target = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:  # a NUL byte in an index entry, a link loop
        raise EllaLoadError(f"{path!r}{_via(entry)}: not a usable file name ({e}); not opened.") from None
    if any(target.is_relative_to(os.path.realpath(r)) for r in roots):
        return path
    where = ", ".join(str(r) for r in roots) or "no folder"
    raise EllaLoadError(f"{path}{_via(entry)}: leads to {target}, outside the model folder ({where}); not opened. "
                        "Keep every file of a model inside its model folder.")


def _via(entry: str | None) -> str:
    return f" (entry {entry!r})" if entry is not None else ""


def default_roots(*paths: str | os.PathLike | None) -> list[Path]:
    """The roots for files a caller named directly: a folder itself, a file's folder (and the folder of
    the file a link names). Inside a Hugging Face cache (`models--org--name/snapshots/<rev>`), the cache
    folder, whose snapshots link into blobs/."""
    roots = []
    for p in paths:
        if p is None:
            continue
        p = Path(p).expanduser()
        if p.is_file():
            roots.append(Path(os.path.realpath(p)).parent)
        root = p if p.is_dir() else p.parent
        for parent in (root, *root.parents):
            if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
                root = parent.parent.parent
                break
        roots.append(root)
    return roots
