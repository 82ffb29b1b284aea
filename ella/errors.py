"""Errors the library raises for bad user input (files, folders, arguments)."""

from __future__ import annotations


class EllaError(ValueError):
    """A problem with user-supplied input, explained in words a user can act on."""


class EllaLoadError(EllaError):
    """A model file or folder could not be loaded; the message names it."""
