"""Source of a package fcpass plugs into that cannot be installed here, unpacked from its sdist on the registry.

vllm-ascend's compile path (its GraphFusionPassManager, ``fusion_pass_compile``)
imports without torch_npu, but its distribution cannot be installed on CPU
(its build wants CANN, and installed it registers itself as vLLM's platform,
which then imports torch_npu). So only its ``vllm_ascend/`` package is
unpacked from the sdist PyPI serves, checked against the index's sha256,
into ``.deps/`` (tests put that folder on sys.path).

    python -m devtools.sources        # what `make test` runs first; does nothing when already unpacked
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

DEPS_DIR = Path(__file__).resolve().parent.parent / ".deps"
SIMPLE_INDEX = "https://pypi.org/simple"
VLLM_ASCEND = ("vllm-ascend", "0.23.0.post1", "vllm_ascend")


def source_dir(project: str = VLLM_ASCEND[0], version: str = VLLM_ASCEND[1]) -> Path:
    """The folder holding the unpacked package (put it on sys.path)."""
    return DEPS_DIR / f"{project}-{version}"


def fetch(project: str, version: str, package: str) -> Path:
    """Unpack ``package/`` of ``project``'s ``version`` sdist into :func:`source_dir`, once; returns that folder."""
    target = source_dir(project, version)
    if (target / package / "__init__.py").is_file():
        return target
    url, sha256 = _sdist(project, version)
    data = urllib.request.urlopen(url, timeout=300).read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{url}: sha256 differs from the index's {sha256}")
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as sdist:
        root = sdist.getnames()[0].split("/")[0]
        members = [m for m in sdist.getmembers() if m.name.startswith(f"{root}/{package}/") and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(root) + 1:]
        sdist.extractall(partial, members=members, filter="data")
    partial.rename(target)
    return target


def _sdist(project: str, version: str) -> tuple[str, str]:
    """(URL, sha256) of the sdist, from the registry's JSON simple index (PEP 691)."""
    request = urllib.request.Request(f"{SIMPLE_INDEX}/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
    name = f"{project.replace('-', '_')}-{version}.tar.gz"
    for entry in files:
        if entry["filename"] == name:
            return entry["url"], entry["hashes"]["sha256"]
    raise RuntimeError(f"{project} {version}: no sdist {name} on {SIMPLE_INDEX}")


if __name__ == "__main__":
    print(fetch(*VLLM_ASCEND), file=sys.stderr)
