"""tests/upstream.py: pinned trees from the offline cache or downloaded, checked by content; a download served
over HTTP on 127.0.0.1 (no other network), repacked as GitHub packs it (another top folder, other bytes)."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import upstream

FILES = {"__init__.py": b"NODE_CLASS_MAPPINGS = {}\n", "nodes/sampling.py": b"def sample():\n    return 1\n",
         "README.md": b"# toy\n"}
ABSENT = "models/large_vocab.json"  # upstream has it, the offline cache's copy leaves it out


def pack(files: dict[str, bytes], top: str, *, mtime: int = 0, reverse: bool = False) -> bytes:
    """A .tar.gz of `files` under the folder `top`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        dir_info = tarfile.TarInfo(top)
        dir_info.type, dir_info.mtime = tarfile.DIRTYPE, mtime
        tar.addfile(dir_info)
        for path in sorted(files, reverse=reverse):
            info = tarfile.TarInfo(f"{top}/{path}")
            info.size, info.mtime = len(files[path]), mtime
            tar.addfile(info, io.BytesIO(files[path]))
    return out.getvalue()


class Served:
    """An HTTP server on 127.0.0.1 that serves `files` (URL path -> bytes) and counts the requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                served.requests += 1
                body = served.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def served():
    server = Served()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A pin "toy" whose digest comes from the offline cache's copy (folder toy/, without ABSENT), and where
    things go: {"shared": ..., "downloads": ...}."""
    shared = tmp_path / "shared"
    (shared / "packs").mkdir(parents=True)
    (shared / "packs" / "toy.tar.gz").write_bytes(pack(FILES, "toy"))
    digest = upstream.content_digest(shared / "packs" / "toy.tar.gz")
    pin = upstream.Pin(repo="someone/toy", commit="c" * 40, folder="toy", shared="packs/toy.tar.gz", digest=digest,
                       absent=(ABSENT,))
    monkeypatch.setitem(upstream.PINS, "toy", pin)
    monkeypatch.setattr(upstream, "_missing", {})
    return {"shared": shared, "downloads": tmp_path / "downloads"}


def github_like(files: dict[str, bytes]) -> bytes:
    """`files` as GitHub's archive of the toy pin holds them: top folder REPO-COMMIT, ABSENT too, other bytes."""
    return pack({**files, ABSENT: b'{"vocab": []}\n'}, f"toy-{'c' * 40}", mtime=1_700_000_000, reverse=True)


def test_the_digest_counts_content_not_archive_bytes_or_top_folder(toy):
    pin = upstream.PINS["toy"]
    repacked = toy["shared"] / "repacked.tar.gz"
    repacked.write_bytes(github_like(FILES))
    assert repacked.read_bytes() != (toy["shared"] / pin.shared).read_bytes()
    assert upstream.content_digest(repacked, pin.absent) == pin.digest
    assert upstream.content_digest(repacked) != pin.digest  # ABSENT counts unless the pin leaves it out
    repacked.write_bytes(github_like({**FILES, "README.md": b"# toy!\n"}))
    assert upstream.content_digest(repacked, pin.absent) != pin.digest


def test_the_offline_cache_comes_first_and_is_unpacked_under_the_pins_folder(toy, served, tmp_path):
    found = upstream.archive("toy", shared=toy["shared"], downloads=toy["downloads"], url=served.url + "/toy.tar.gz")
    assert found == toy["shared"] / "packs" / "toy.tar.gz" and served.requests == 0
    folder = upstream.unpack("toy", tmp_path / "custom_nodes", shared=toy["shared"], downloads=toy["downloads"])
    assert folder == tmp_path / "custom_nodes" / "toy"
    assert {p: (folder / p).read_bytes() for p in FILES} == FILES


def test_a_download_with_the_pinned_content_is_accepted_kept_and_unpacked(toy, served, tmp_path):
    served.files["/someone/toy/archive.tar.gz"] = github_like(FILES)
    where = {"shared": tmp_path / "no-shared", "downloads": toy["downloads"],
             "url": served.url + "/someone/toy/archive.tar.gz"}
    folder = upstream.unpack("toy", tmp_path / "custom_nodes", **where)
    assert folder == tmp_path / "custom_nodes" / "toy"  # not toy-cccc...: the pin's folder
    assert {p: (folder / p).read_bytes() for p in FILES} == FILES and (folder / ABSENT).is_file()
    assert [p.name for p in toy["downloads"].iterdir()] == [f"toy-{'c' * 40}.tar.gz"]
    upstream.archive("toy", **where)
    assert served.requests == 1  # the kept download, not a second one


def test_a_download_with_other_content_is_refused_and_deleted(toy, served, tmp_path):
    served.files["/toy.tar.gz"] = github_like({**FILES, "nodes/sampling.py": b"def sample():\n    return 2\n"})
    with pytest.raises(upstream.Missing) as missing:
        upstream.archive("toy", shared=tmp_path / "no-shared", downloads=toy["downloads"], url=served.url + "/toy.tar.gz")
    message = str(missing.value)
    assert "\n" not in message and message.startswith("toy missing: not in ")
    assert "was refused: its content digest" in message and upstream.PINS["toy"].digest in message
    assert not any(toy["downloads"].iterdir())


def test_an_unreachable_source_fails_fast_with_one_line_and_is_tried_once(toy, served, tmp_path):
    where = {"shared": tmp_path / "no-shared", "downloads": toy["downloads"], "url": served.url + "/nothing.tar.gz"}
    start = time.monotonic()
    for _ in range(3):
        with pytest.raises(upstream.Missing) as missing:
            upstream.archive("toy", **where)
    assert time.monotonic() - start < 5 and served.requests == 1
    assert str(missing.value) == (f"toy missing: not in {tmp_path / 'no-shared' / 'packs'}, and "
                                  f"{served.url}/nothing.tar.gz could not be fetched (HTTP Error 404: Not Found)")


def test_an_offline_cache_copy_with_other_content_is_refused(toy):
    (toy["shared"] / "packs" / "toy.tar.gz").write_bytes(pack({**FILES, "README.md": b"changed\n"}, "toy"))
    with pytest.raises(upstream.Refused, match="is not the pinned"):
        upstream.archive("toy", shared=toy["shared"], downloads=toy["downloads"])


@pytest.mark.parametrize("name", sorted(upstream.PINS))
def test_the_offline_cache_holds_the_pinned_trees(name):
    cached = upstream.SHARED / upstream.PINS[name].shared
    if not cached.is_file():
        pytest.skip(f"{name}: no offline copy in {cached.parent} (the pin is checked where it is downloaded)")
    assert upstream.content_digest(cached, upstream.PINS[name].absent) == upstream.PINS[name].digest


def test_a_real_pack_repacked_as_github_serves_it_is_accepted(served, tmp_path, monkeypatch):
    """AnimateDiff-Evolved from the offline cache, under GitHub's top folder name, as the download."""
    name = "ComfyUI-AnimateDiff-Evolved"
    pin = upstream.PINS[name]
    cached = upstream.SHARED / pin.shared
    if not cached.is_file():
        pytest.skip(f"{name}: no offline copy in {cached.parent} to repack")
    with tarfile.open(cached) as tar:
        files = {m.name.partition("/")[2]: tar.extractfile(m).read() for m in tar if m.isreg()}
    served.files["/archive.tar.gz"] = pack(files, f"{name}-{pin.commit}", mtime=1_700_000_000, reverse=True)
    monkeypatch.setattr(upstream, "_missing", {})
    folder = upstream.unpack(name, tmp_path / "custom_nodes", shared=tmp_path / "no-shared",
                             downloads=tmp_path / "downloads", url=served.url + "/archive.tar.gz")
    assert folder == tmp_path / "custom_nodes" / name and (folder / "__init__.py").is_file()


def test_the_cli_says_what_is_missing_in_one_line_and_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(upstream, "SHARED", tmp_path / "no-shared")
    monkeypatch.setattr(upstream, "DOWNLOADS", tmp_path / "downloads")
    monkeypatch.setattr(upstream, "_missing", {})
    monkeypatch.setattr(upstream, "ARCHIVE_URL", "http://127.0.0.1:9/{repo}/{commit}.tar.gz")  # discard port
    assert upstream.main(["unpack", "comfyui-0.33.0", str(tmp_path / "host")]) == upstream.MISSING_EXIT
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("comfyui-0.33.0 missing: not in ") and "could not be fetched" in out
    assert not (tmp_path / "downloads").exists()


def test_the_pins_are_whole():
    for name, pin in upstream.PINS.items():
        assert len(pin.commit) == 40 and len(pin.digest) == 64 and pin.repo.count("/") == 1, name
        assert pin.url == f"https://github.com/{pin.repo}/archive/{pin.commit}.tar.gz"
    assert Path(upstream.DOWNLOADS).relative_to(upstream.ROOT).parts[0] == ".ci-hosts"  # ignored by git
