"""Find the files of a T5 encoder in every layout users have on disk.

Layouts: a Hugging Face folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json), the Hugging Face cache (models--org--name with
refs/ and snapshots/), the ELLA authors' folder (models--google--flan-t5-xl--text_encoder,
a plain folder) and a single encoder-only .safetensors file. Only safetensors
weights are used: pickle-based files are refused by name, never opened.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EllaLoadError

log = logging.getLogger("ELLA")

TOKENIZER_NAMES = ("tokenizer.json", "spiece.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one T5 checkpoint and what sits next to them."""

    files: tuple[Path, ...]  # one file, or every shard of a sharded checkpoint
    label: Path  # the file to name in messages: the single file or the shard index
    config: Path | None  # config.json of a folder layout; None for a single file
    folder: Path  # folder holding the weights (the snapshot folder for the HF cache)
    single_file: bool  # True when the user picked one weights file


def resolve_hf_cache(path: Path) -> Path:
    """Map a Hugging Face cache folder (`models--org--name`) to its snapshot; other paths pass through."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        if (snapshots / revision).is_dir():
            return snapshots / revision
        log.warning("%s: refs/main names snapshot %s, which is missing; using the newest snapshot.", path, revision)
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise EllaLoadError(f"{path}: Hugging Face cache folder with no snapshot in snapshots/; download the model again.")
    return candidates[-1]


def find_weights(path: str | os.PathLike) -> WeightFiles:
    """Locate the safetensors weights for a folder, HF cache folder, index file or single file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _weights_in_folder(resolve_hf_cache(path))
    if not path.is_file():
        raise EllaLoadError(
            f"{path}: no such file or folder; expected a T5 encoder (a Hugging Face folder such as "
            "models--google--flan-t5-xl--text_encoder, or an encoder .safetensors file)."
        )
    name = path.name.lower()
    if name.endswith(_INDEX_SUFFIX):
        return _sharded(path, _config_in(path.parent))
    if name == "config.json":
        return _weights_in_folder(path.parent)
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


def _weights_in_folder(folder: Path) -> WeightFiles:
    config = _config_in(folder)
    indexes = sorted(folder.glob("*" + _INDEX_SUFFIX))
    if indexes:
        preferred = folder / ("model" + _INDEX_SUFFIX)
        return _sharded(preferred if preferred in indexes else indexes[0], config)
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


def _sharded(index: Path, config: Path | None) -> WeightFiles:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EllaLoadError(f"{index}: not a valid safetensors shard index ({e}); download it again.") from None
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EllaLoadError(
            f"{index}: {len(missing)} shard file(s) listed in the index are missing ({', '.join(missing[:4])}); "
            "download them into the same folder."
        )
    if not files:
        raise EllaLoadError(f"{index}: the shard index lists no files; download it again.")
    return WeightFiles(tuple(files), index, config, index.parent, False)


def tokenizer_places(weights: WeightFiles) -> list[Path]:
    """Folders searched for a tokenizer when none is given: beside the weights (and diffusers' tokenizer/)."""
    places = [weights.folder]
    if not weights.single_file:
        places += [weights.folder / "tokenizer", weights.folder.parent / "tokenizer"]
    return places


def find_tokenizer(explicit: str | os.PathLike | None, weights: WeightFiles | None) -> Path:
    """Return the tokenizer file to use: the explicit path (file or folder) or one found beside the weights."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise EllaLoadError(
                f"{path}: tokenizer path does not exist; give a folder holding tokenizer.json or spiece.model, "
                "or one of those files."
            )
        places = [resolve_hf_cache(path)]
    else:
        assert weights is not None, "give a tokenizer path or the weights it belongs to"
        places = tokenizer_places(weights)
    for folder in places:
        for name in TOKENIZER_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise _tokenizer_missing(places, explicit is not None, weights)


def _tokenizer_missing(places: list[Path], explicit: bool, weights: WeightFiles | None) -> EllaLoadError:
    looked = "\n".join(f"  - {folder / name}" for folder in places for name in TOKENIZER_NAMES)
    target = places[0] if explicit or weights is None else weights.folder
    owner = f" for {weights.label}" if weights is not None and not explicit else ""
    return EllaLoadError(
        f"No T5 tokenizer found{owner}. Looked for:\n{looked}\n"
        f"Fix: copy tokenizer.json (or spiece.model) of google/flan-t5-xl into {target}, "
        "or set the tokenizer path to a folder or a tokenizer.json / spiece.model file."
    )
