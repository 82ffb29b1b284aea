"""Prompts for batch generation: a folder of `.txt` files (one prompt each, DPG-Bench's layout) or one text
file with a prompt per line. Each prompt has a stable name that names its output file and seeds its noise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import EllaError

__all__ = ["MAX_PROMPT_BYTES", "Prompt", "read_prompts"]

MAX_PROMPT_BYTES = 16 * 1024  # a DPG-Bench prompt is under 1 KB; T5 reads at most 512 tokens (about 2 KB)
MAX_LINES_FILE_BYTES = 64 * 1024 * 1024
log = logging.getLogger("ELLA")


@dataclass(frozen=True)
class Prompt:
    """One prompt: `name` (a prompt file's stem, or the line number in a lines file) and its text."""

    name: str
    text: str


def read_prompts(path: str | Path) -> tuple[list[Prompt], list[str]]:
    """(prompts sorted by name, problems): `path` is a folder of `.txt` files or one text file with a prompt
    per line (named by its line number, 00001 first; blank lines are passed over). A prompt file that is empty,
    not UTF-8 or over MAX_PROMPT_BYTES, or a line over it, is left out and described in `problems` by name."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_lines(path)
    raise EllaError(f"{path}: no such folder or file; expected a folder of .txt prompt files (DPG-Bench's "
                    "dpg_bench/prompts/) or a text file with one prompt per line.")


def _read_folder(folder: Path) -> tuple[list[Prompt], list[str]]:
    files = sorted(f for f in folder.iterdir() if f.suffix == ".txt" and not f.name.startswith("."))
    if not files:
        raise EllaError(f"{folder}: no .txt prompt files in this folder; expected one prompt per .txt file "
                        "(the output takes the file's name, with .png).")
    prompts, problems = [], []
    for file in files:
        text, problem = _read_one(file)
        if problem:
            problems.append(f"{file}: {problem}; skipped.")
        else:
            prompts.append(Prompt(file.stem, text))
    return prompts, problems


def _read_one(file: Path) -> tuple[str, str | None]:
    """(text, None) or ("", what is wrong with the prompt file)."""
    try:
        size = file.stat().st_size
        if not file.is_file():
            return "", "not a regular file"
        if size > MAX_PROMPT_BYTES:
            return "", f"{size} bytes, over the limit of {MAX_PROMPT_BYTES} bytes for one prompt"
        data = file.read_bytes()
    except OSError as e:
        return "", f"cannot be read ({e.strerror or e})"
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return "", f"not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); save it as UTF-8"
    if not text:
        return "", "empty (no prompt text)"
    return text, None


def _read_lines(file: Path) -> tuple[list[Prompt], list[str]]:
    try:
        size = file.stat().st_size
        if size > MAX_LINES_FILE_BYTES:
            raise EllaError(f"{file}: {size} bytes, over the limit of {MAX_LINES_FILE_BYTES} bytes for a prompt list.")
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EllaError(f"{file}: not UTF-8 text (at byte {e.start}); save the prompt list as UTF-8.") from None
    except OSError as e:
        raise EllaError(f"{file}: cannot be read ({e.strerror or e}).") from None
    lines = text.splitlines()
    width = max(5, len(str(len(lines))))
    prompts, problems = [], []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue  # blank lines separate prompts; the numbers stay the file's line numbers
        if len(line.encode("utf-8")) > MAX_PROMPT_BYTES:
            problems.append(f"{file}: line {number} is over the limit of {MAX_PROMPT_BYTES} bytes for one prompt; skipped.")
        else:
            prompts.append(Prompt(f"{number:0{width}d}", line))
    if not prompts:
        raise EllaError(f"{file}: no prompts in this file; expected one prompt per line.")
    return prompts, problems
