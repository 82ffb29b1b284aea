"""Model folders: register ComfyUI's `ella` folder, list T5 encoders users have, resolve names safely."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import folder_paths

from ..ella import EllaLoadError

ELLA_FOLDER = "ella"
OFFICIAL_T5_FOLDER = "ella_encoder"  # the official ComfyUI-ELLA pack keeps T5 here
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip", OFFICIAL_T5_FOLDER)
HF_CACHE_PREFIX = "hf-cache/"
_T5_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "snapshots")


def register_folders() -> None:
    """Add `models/ella`, `models/ella_encoder` and `models/text_encoders` (where a ComfyUI has none yet),
    keeping entries extra_model_paths.yaml already added."""
    for name in (ELLA_FOLDER, OFFICIAL_T5_FOLDER, "text_encoders"):
        default = os.path.join(folder_paths.models_dir, name)
        paths, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = [*paths, default]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | {".safetensors"})


def ella_files() -> list[str]:
    """Connector files in the `ella` folders (symlinks that lead out of them are left out)."""
    bases = [Path(b) for b in _folders(ELLA_FOLDER)]
    return [f for f in folder_paths.get_filename_list(ELLA_FOLDER)
            if f.endswith(".safetensors") and _found_inside(f, bases)]


def ella_path(name: str) -> Path:
    """The file behind a listed connector name; anything not listed is refused."""
    if name not in ella_files():
        raise EllaLoadError(f"ELLA model {name!r} is not in the ella model folders "
                            f"({', '.join(_folders(ELLA_FOLDER)) or 'none'}); put the .safetensors file there.")
    return Path(folder_paths.get_full_path(ELLA_FOLDER, name))


def t5_choices() -> dict[str, Path]:
    """Name -> path of every T5 candidate: folders (plain, HF cache, the authors' layout) and single
    .safetensors files under the text encoder folders, plus T5 repos in the Hugging Face hub cache."""
    found: dict[str, Path] = {}
    for folder in TEXT_ENCODER_FOLDERS:
        for base in _folders(folder):
            for entry in sorted(_entries(Path(base))):
                if _inside(entry, Path(base)):
                    found.setdefault(entry.relative_to(base).as_posix(), entry)
    hub = _hf_hub_cache()
    if hub is not None:
        for entry in sorted(hub.glob("models--*")):
            if "t5" in entry.name.lower() and (entry / "snapshots").is_dir() and _inside(entry, hub):
                found.setdefault(HF_CACHE_PREFIX + entry.name, entry)
    return found


def t5_path(name: str) -> Path:
    """The folder or file behind a listed T5 name; anything not listed is refused."""
    choices = t5_choices()
    if name not in choices:
        raise EllaLoadError(f"T5 encoder {name!r} is not in the text encoder folders "
                            f"({', '.join(p for f in TEXT_ENCODER_FOLDERS for p in _folders(f))}); "
                            "put the T5 folder or encoder .safetensors file there.")
    return choices[name]


def t5_root(name: str, path: Path) -> Path:
    """The model folder a listed T5 `name` (at `path`) may read from: the text encoder folder it is listed
    in, or for the Hugging Face hub cache its `models--org--name` folder (snapshots link into its blobs/)."""
    if name.startswith(HF_CACHE_PREFIX):
        return path
    return path.parents[len(PurePosixPath(name).parts) - 1]


def _found_inside(name: str, bases: list[Path]) -> bool:
    """Whether the first base holding `name` (as ComfyUI resolves it) holds it without leading out."""
    for base in bases:
        if (base / name).exists():
            return _inside(base / name, base)
    return False  # e.g. a dangling symlink


def _inside(entry: Path, base: Path) -> bool:
    """Whether `entry` and, for a folder, every file in it resolve to places inside `base`."""
    root = base.resolve()
    paths = [entry, *entry.rglob("*")] if entry.is_dir() else [entry]
    return all(p.resolve().is_relative_to(root) for p in paths)


def _folders(name: str) -> list[str]:
    try:
        return [p for p in folder_paths.get_folder_paths(name) if os.path.isdir(p)]
    except KeyError:
        return []


def _entries(base: Path, max_depth: int = 3) -> list[Path]:
    """T5-looking folders (not descended into) and loose .safetensors files under `base`."""
    out: list[Path] = []
    for folder, dirs, files in os.walk(base, followlinks=True):
        here = Path(folder)
        depth = len(here.relative_to(base).parts)
        if depth and any(m in files or m in dirs for m in _T5_MARKERS):
            out.append(here)
            dirs.clear()
            continue
        out += [here / f for f in files if f.endswith(".safetensors")]
        if depth >= max_depth:
            dirs.clear()
    return out


def _hf_hub_cache() -> Path | None:
    env = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    path = Path(env) if env else Path.home() / ".cache" / "huggingface" / "hub"
    return path if path.is_dir() else None
