"""The upstream source trees the tests run with (a ComfyUI host, other packs), pinned by commit and content.

Each pinned tree is taken from the first place that has it:
  1. the offline cache: ../shared beside the clone, or the folder $ELLA_SHARED names (PIN.shared inside it);
  2. an earlier download in .ci-hosts/downloads/;
  3. GitHub's archive of the pinned commit, downloaded there (a short timeout: offline, this fails at once).
Every archive is checked against its pinned content digest (see content_digest) before use. One that is
nowhere raises Missing, whose message is one line for a skip; a cached copy whose content differs raises
Refused; a download whose content differs is deleted and raises Missing saying it was refused.

Standard library only, so that .ci/run can call it before anything is installed:
    python tests/upstream.py unpack NAME DEST       # prints DEST/<folder>; or exit 3, printing what is missing
    python tests/upstream.py check                  # checks the offline cache's copy of every pin (fetches none)
    python tests/upstream.py digest ARCHIVE [NAME]  # an archive's content digest (NAME's absent files left out)
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ELLA_SHARED") or ROOT.parent / "shared")
DOWNLOADS = ROOT / ".ci-hosts" / "downloads"
ARCHIVE_URL = "https://github.com/{repo}/archive/{commit}.tar.gz"
TIMEOUT_S = 10.0
MISSING_EXIT = 3


@dataclass(frozen=True)
class Pin:
    """A GitHub repository at one commit: the folder it unpacks to, its archive's path in the offline cache,
    its content digest, and the files upstream has that the cached copy leaves out (not in the digest)."""

    repo: str
    commit: str
    folder: str
    shared: str
    digest: str
    absent: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return ARCHIVE_URL.format(repo=self.repo, commit=self.commit)


# name -> pin; the digests were computed from ../shared's copies (git archive of the three packs' commits agrees)
PINS = {
    "comfyui-0.33.0": Pin(
        repo="comfyanonymous/ComfyUI", commit="783545f689a0af730065994b46b382ae24844c99", folder="ComfyUI",
        shared="hosts/comfyui-0.33.0.tar.gz",
        digest="000d57ec2252fe416de4cd322927586096a4421322aeb545a2afa0369c72de85",
        absent=("comfy/text_encoders/llama_tokenizer/tokenizer.json", "comfy/text_encoders/qwen35_tokenizer/vocab.json")),
    "ComfyUI-AnimateDiff-Evolved": Pin(
        repo="Kosinkadink/ComfyUI-AnimateDiff-Evolved", commit="d8d163cd90b1111f6227495e3467633676fbb346",
        folder="ComfyUI-AnimateDiff-Evolved", shared="packs/ComfyUI-AnimateDiff-Evolved.tar.gz",
        digest="35e3fb9461f3e4f741faebcce3cf0970a8c9105c0805930a87a0fdb6f6530166"),
    "ComfyUI_IPAdapter_plus": Pin(
        repo="cubiq/ComfyUI_IPAdapter_plus", commit="9d076a3df0d2763cef5510ec5ab807f6632c39f5",
        folder="ComfyUI_IPAdapter_plus", shared="packs/ComfyUI_IPAdapter_plus.tar.gz",
        digest="91c2767dc2578734afac69b2c535b63aa5cc309739d97a6e77b1f9d3710bb1bd"),
    "ComfyUI-Distributed": Pin(
        repo="robertvoy/ComfyUI-Distributed", commit="a91f9fb081eb5fc27db429a7c3f35d2ef7ce4a50",
        folder="ComfyUI-Distributed", shared="packs/ComfyUI-Distributed.tar.gz",
        digest="3445f4bd937bb8c5cb93cc35ae2768b0063ea042e7ad00363f88967d67fc8b5c"),
}


class Missing(Exception):
    """A pinned tree that is neither cached nor fetchable; str() is one line naming it and why."""


class Refused(Exception):
    """A cached archive whose content is not the pinned one."""


def content_digest(archive: Path, absent: tuple[str, ...] = ()) -> str:
    """sha256 of the lines "<sha256 of the file>  <path>\\n", sorted by path, of the archive's regular files.

    Paths are taken below the archive's one top folder and `absent` ones are left out, so neither the
    archive's bytes (compression, times, order) nor its top folder's name counts. The same digest of an
    unpacked tree: (cd TREE && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum
    """
    lines, tops = [], set()
    with tarfile.open(archive) as tar:
        for member in tar:
            top, _, path = member.name.removeprefix("./").partition("/")
            tops.add(top)
            if member.isreg() and path not in absent:
                data = tar.extractfile(member).read()
                lines.append((path.encode(), f"{hashlib.sha256(data).hexdigest()}  {path}\n".encode()))
    if len(tops) != 1 or any(not path for path, _ in lines):
        raise Refused(f"{archive} does not hold one top folder (it holds {', '.join(sorted(tops)) or 'nothing'})")
    return hashlib.sha256(b"".join(line for _, line in sorted(lines))).hexdigest()


_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> digest, for this process
_missing: dict[str, Missing] = {}  # what could not be fetched, so that it is tried once per process


def _digest(archive: Path, pin: Pin) -> str:
    stat = archive.stat()
    key = (str(archive), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        _checked[key] = content_digest(archive, pin.absent)
    return _checked[key]


def _check(archive: Path, pin: Pin) -> Path:
    digest = _digest(archive, pin)
    if digest != pin.digest:
        raise Refused(f"{archive}: content digest {digest} is not the pinned {pin.digest} of {pin.repo}@{pin.commit}"
                      " (delete it, or correct the copy)")
    return archive


def archive(name: str, *, shared: Path | None = None, downloads: Path | None = None, url: str | None = None,
            timeout: float = TIMEOUT_S) -> Path:
    """The checked archive of PINS[name]: the offline cache's copy, else an earlier download, else a new one."""
    pin = PINS[name]
    cached = (shared or SHARED) / pin.shared
    if cached.is_file():
        return _check(cached, pin)
    downloaded = (downloads or DOWNLOADS) / f"{name}-{pin.commit}.tar.gz"
    if downloaded.is_file():
        return _check(downloaded, pin)
    if name not in _missing:
        try:
            return _fetch(pin, url or pin.url, downloaded, timeout)
        except Missing as missing:
            _missing[name] = Missing(f"{name} missing: not in {cached.parent}, and {missing}")
    raise _missing[name]


def _fetch(pin: Pin, url: str, target: Path, timeout: float) -> Path:
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        digest = content_digest(part, pin.absent)
    except (OSError, ValueError, http.client.HTTPException, tarfile.TarError, Refused) as error:
        part.unlink(missing_ok=True)
        raise Missing(f"{url} could not be fetched ({error})".replace("\n", " ")) from error
    if digest != pin.digest:
        part.unlink()
        raise Missing(f"{url} was refused: its content digest {digest} is not the pinned {pin.digest}")
    part.replace(target)
    return target


def unpack(name: str, dest: Path, **where) -> Path:
    """PINS[name]'s checked archive unpacked into `dest` (its top folder named PIN.folder); returns that folder."""
    return unpack_archive(archive(name, **where), PINS[name].folder, dest)


def unpack_archive(path: Path, folder: str, dest: Path) -> Path:
    """The archive's top folder extracted into dest/`folder`, whatever its name in the archive."""
    with tarfile.open(path) as tar:
        members = list(tar)
        for member in members:
            member.name = _renamed(member.name, folder)
            if member.islnk():
                member.linkname = _renamed(member.linkname, folder)
        tar.extractall(dest, members=members, filter="data")
    return Path(dest) / folder


def _renamed(name: str, folder: str) -> str:
    _, _, path = name.removeprefix("./").partition("/")
    return f"{folder}/{path}" if path else folder


def main(argv: list[str]) -> int:
    """The CLI (see the module's docstring)."""
    try:
        if argv[:1] == ["unpack"] and len(argv) == 3:
            print(unpack(argv[1], Path(argv[2])))
        elif argv == ["check"]:
            for name, pin in PINS.items():
                cached = SHARED / pin.shared
                print(f"{name}: {'ok' if cached.is_file() and _check(cached, pin) else f'not in {cached.parent}'}")
        elif argv[:1] == ["digest"] and len(argv) in (2, 3):
            print(content_digest(Path(argv[1]), PINS[argv[2]].absent if len(argv) == 3 else ()))
        else:
            print(__doc__.split("\n\n")[-1].rstrip(), file=sys.stderr)
            return 2
    except Missing as missing:
        print(missing)
        return MISSING_EXIT
    except Refused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
