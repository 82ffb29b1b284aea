"""Find the files of a T5 encoder in every layout users have on disk.

Layouts: a Hugging Face folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json), the Hugging Face cache (models--org--name with
refs/ and snapshots/), the ELLA authors' folder (models--google--flan-t5-xl--text_encoder,
a plain folder) and a single encoder-only .safetensors file. Only safetensors
weights are used: pickle-based files are refused by name, never opened. Every file is checked, before it
is opened, to resolve inside the given roots (see `containment`): index entries, refs/main and links
that lead out are refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .containment import Roots, contained, default_roots
from .errors import EllaLoadError, fenced

log = logging.getLogger("ELLA")

TOKENIZER_NAMES = ("tokenizer.json", "spiece.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_INDEX_SUFFIX = ".safetensors.index.json"
_MAX_SMALL_FILE = 64 * 1024 * 1024  # refs/main, config.json, a shard index: far smaller in real models


def read_small_text(path: Path, roots: Roots, what: str) -> str:
    """The text of a small metadata file inside `roots`, size-checked before reading."""
    contained(path, roots)
    try:
        size = path.stat().st_size
        if size > _MAX_SMALL_FILE:
            raise EllaLoadError(f"{path}: {size} bytes, too large for {what} (at most {_MAX_SMALL_FILE}).")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EllaLoadError(f"{path}: cannot read {what} ({e}).") from None


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one T5 checkpoint and what sits next to them."""

    files: tuple[Path, ...]  # one file, or every shard of a sharded checkpoint
    label: Path  # the file to name in messages: the single file or the shard index
    config: Path | None  # config.json of a folder layout; None for a single file
    folder: Path  # folder holding the weights (the snapshot folder for the HF cache)
    single_file: bool  # True when the user picked one weights file


def resolve_hf_cache(path: Path, roots: Roots | None = None) -> Path:
    """Map a Hugging Face cache folder (`models--org--name`) to its snapshot; other paths pass through.
    refs/main and the snapshot must lie inside `roots` (default: the cache folder)."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    roots = default_roots(path) if roots is None else roots
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = read_small_text(ref, roots, "a Hugging Face refs/main file").strip()
        if revision and (snapshots / revision).is_dir():
            return contained(snapshots / revision, roots, entry=f"refs/main: {revision}")
        log.warning("%s: refs/main names snapshot %r, which is missing; using the newest snapshot.", path, revision)
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise EllaLoadError(f"{path}: Hugging Face cache folder with no snapshot in snapshots/; download the model again.")
    return contained(candidates[-1], roots)


def find_weights(path: str | os.PathLike, roots: Roots | None = None) -> WeightFiles:
    """Locate the safetensors weights for a folder, HF cache folder, index file or single file. Every file
    found must lie inside `roots` (default: the folder itself, or a file's folder)."""
    path = Path(path).expanduser()
    roots = default_roots(path) if roots is None else roots
    found = _find_weights(path, roots)
    for file in (*found.files, found.config):
        if file is not None:
            contained(file, roots)
    return found


def _find_weights(path: Path, roots: Roots) -> WeightFiles:
    contained(path, roots)
    if path.is_dir():
        return _weights_in_folder(resolve_hf_cache(path, roots), roots)
    if not path.is_file():
        raise EllaLoadError(
            f"{path}: no such file or folder; expected a T5 encoder (a Hugging Face folder such as "
            "models--google--flan-t5-xl--text_encoder, or an encoder .safetensors file)."
        )
    name = path.name.lower()
    if name.endswith(_INDEX_SUFFIX):
        return _sharded(path, _config_in(path.parent), roots)
    if name == "config.json":
        return _weights_in_folder(path.parent, roots)
    if name.endswith(".safetensors"):
        return WeightFiles((path,), path, None, path.parent, True)
    if name.endswith(_PICKLE_SUFFIXES) or name.endswith(".bin.index.json"):
        raise pickle_refused(path)
    raise EllaLoadError(f"{path}: not a .safetensors file; expected T5 encoder weights in safetensors format.")


def pickle_refused(path: Path) -> EllaLoadError:
    """The error for pickle-based weights, which are never unpickled."""
    return EllaLoadError(
        f"{path}: only .safetensors weights are supported. This is a pickle-based PyTorch file "
        "(pytorch_model.bin / .pt / .ckpt); it is not opened, because unpickling can run arbitrary code. "
        "Download model.safetensors for this model instead (google/flan-t5-xl has one), or convert the file "
        "to safetensors."
    )


def _config_in(folder: Path) -> Path | None:
    config = folder / "config.json"
    return config if config.is_file() else None


def _weights_in_folder(folder: Path, roots: Roots) -> WeightFiles:
    config = _config_in(folder)
    indexes = sorted(folder.glob("*" + _INDEX_SUFFIX))
    if indexes:
        preferred = folder / ("model" + _INDEX_SUFFIX)
        return _sharded(preferred if preferred in indexes else indexes[0], config, roots)
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return WeightFiles((files[0],), files[0], config, folder, False)
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:6])
        raise EllaLoadError(
            f"{folder}: several .safetensors files ({names}) and no model.safetensors.index.json; "
            "pick the T5 encoder file itself."
        )
    pickles = sorted(p for p in folder.iterdir() if p.name.lower().endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise pickle_refused(pickles[0])
    raise EllaLoadError(
        f"{folder}: no T5 weights found; expected model.safetensors, a sharded model.safetensors.index.json "
        "with its shards, or a single encoder .safetensors file."
    )


def _sharded(index: Path, config: Path | None, roots: Roots) -> WeightFiles:
    return WeightFiles(tuple(shard_files(index, roots)), index, config, index.parent, False)


def shard_files(index: Path, roots: Roots) -> list[Path]:
    """The shard files a safetensors index (`weight_map`) names, each checked to resolve inside `roots` and to
    exist, before any is opened."""
    text = read_small_text(index, roots, "a safetensors shard index")
    try:
        with fenced(index, "a safetensors shard index (model.safetensors.index.json)"):
            weight_map = json.loads(text)["weight_map"]
            names = sorted({v for v in weight_map.values()})
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError("weight_map values must be shard file names")
    except EllaLoadError as e:
        raise EllaLoadError(f"{e} Download it again.") from None
    files = [contained(index.parent / n, roots, entry=f"weight_map: {n}") for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EllaLoadError(
            f"{index}: {len(missing)} shard file(s) listed in the index are missing ({', '.join(missing[:4])}); "
            "download them into the same folder."
        )
    if not files:
        raise EllaLoadError(f"{index}: the shard index lists no files; download it again.")
    return files


def tokenizer_places(weights: WeightFiles) -> list[Path]:
    """Folders searched for a tokenizer when none is given: beside the weights (and diffusers' tokenizer/)."""
    places = [weights.folder]
    if not weights.single_file:
        places += [weights.folder / "tokenizer", weights.folder.parent / "tokenizer"]
    return places


def find_tokenizer(explicit: str | os.PathLike | None, weights: WeightFiles | None,
                   roots: Roots | None = None) -> Path:
    """Return the tokenizer file to use: the explicit path (file or folder) or one found beside the weights.
    It must lie inside `roots` (default: the explicit path's folder, or the places beside the weights that
    `tokenizer_places` names); places outside them are not searched."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        roots = default_roots(path) if roots is None else roots
        if path.is_file():
            return contained(path, roots)
        if not path.is_dir():
            raise EllaLoadError(
                f"{path}: tokenizer path does not exist; give a folder holding tokenizer.json or spiece.model, "
                "or one of those files."
            )
        places = [resolve_hf_cache(contained(path, roots), roots)]
    else:
        assert weights is not None, "give a tokenizer path or the weights it belongs to"
        places = tokenizer_places(weights)
        roots = [*default_roots(weights.folder), *places] if roots is None else roots
        places = [p for p in places if _lexically_inside(p, roots)]
    for folder in places:
        for name in TOKENIZER_NAMES:
            if (folder / name).is_file():
                return contained(folder / name, roots)
    raise _tokenizer_missing(places, explicit is not None, weights)


def _lexically_inside(path: Path, roots: Roots) -> bool:
    absolute = Path(os.path.abspath(path))
    return any(absolute.is_relative_to(os.path.abspath(r)) for r in roots)


def _tokenizer_missing(places: list[Path], explicit: bool, weights: WeightFiles | None) -> EllaLoadError:
    looked = "\n".join(f"  - {folder / name}" for folder in places for name in TOKENIZER_NAMES)
    target = places[0] if explicit or weights is None else weights.folder
    owner = f" for {weights.label}" if weights is not None and not explicit else ""
    return EllaLoadError(
        f"No T5 tokenizer found{owner}. Looked for:\n{looked}\n"
        f"Fix: copy tokenizer.json (or spiece.model) of google/flan-t5-xl into {target}, "
        "or set the tokenizer path to a folder or a tokenizer.json / spiece.model file."
    )
