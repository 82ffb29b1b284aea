"""Errors the library raises for bad user input (files, folders, arguments), and the fence around parsers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class EllaError(ValueError):
    """A problem with user-supplied input, explained in words a user can act on."""


class EllaLoadError(EllaError):
    """A model file or folder could not be loaded; the message names it."""


_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, EllaError)


@contextmanager
def fenced(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn any failure of a third-party parser reading the untrusted file `path` into an EllaLoadError
    naming it and `what` was expected. BaseException subclasses are caught too (the `tokenizers` library
    raises PanicException, which `except Exception` lets through and which kills ComfyUI's prompt
    worker); only KeyboardInterrupt, SystemExit and GeneratorExit pass, and our own EllaErrors."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except BaseException as e:  # noqa: BLE001  (the point of the fence)
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise EllaLoadError(f"{path}: cannot read {what} ({type(e).__name__}"
                            f"{': ' + detail if detail else ''}).") from None
