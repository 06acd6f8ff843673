"""Files of packages fcpass plugs into that cannot be installed here, unpacked from the registry's distributions.

- vllm-ascend's compile path (0.23.0.post1 for vLLM 0.23, 0.30.0rc2 for vLLM 0.30) (its GraphFusionPassManager, ``fusion_pass_compile``)
  imports without torch_npu, but its distribution cannot be installed on CPU
  (its build wants CANN, and installed it registers itself as vLLM's platform,
  which then imports torch_npu): only its ``vllm_ascend/`` package is
  unpacked from the sdist.
  Its build step also writes ``vllm_ascend/_build_info.py`` (the chip it was
  built for; its device code reads it at import): written here as that step
  writes it for an Atlas A2 (``SOC_VERSION=ascend910b1``).
- torch_npu must never be installed here (it fails to import without CANN):
  from 2.10.0.post4's wheel (the pin of both vllm-ascend releases) only its op
  schemas (``npu_native_functions_by_codegen.yaml``), op docs, package
  ``__init__`` and the ``torch.npu`` modules whose streams, events and device
  calls the stand-in gives vllm-ascend are unpacked; the stand-in is checked
  against them.

Each download is checked against the index's sha256 and unpacked into ``.deps/<project>-<version>/``.

    python -m devtools.sources        # what `make test` runs first; does nothing when already unpacked
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEPS_DIR = Path(__file__).resolve().parent.parent / ".deps"
SIMPLE_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Source:
    project: str
    version: str
    filename: str  # the distribution file on the index
    members: tuple[str, ...]  # paths inside it (a folder ends with "/"), relative to the sdist's root folder

    @property
    def folder(self) -> Path:
        """Where the members are unpacked (put it on sys.path for a package)."""
        return DEPS_DIR / f"{self.project}-{self.version}"

    def path(self, member: str) -> Path:
        return self.folder / member


# vllm-ascend X.Y is built for vLLM X.Y (its README and versioning policy): each release's source, by the vLLM
# major.minor it runs on
VLLM_ASCENDS = {
    "0.23": Source("vllm-ascend", "0.23.0.post1", "vllm_ascend-0.23.0.post1.tar.gz", ("vllm_ascend/",)),
    "0.30": Source("vllm-ascend", "0.30.0rc2", "vllm_ascend-0.30.0rc2.tar.gz", ("vllm_ascend/",)),
}
# torch-npu 2.10.0.post4, both releases' pin: its op schemas and docs, and the torch.npu API (streams, events,
# devices) the stand-in gives vllm-ascend
TORCH_NPU_SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
TORCH_NPU_DOCS = "torch_npu/_op_plugin_docs.py"
TORCH_NPU_PACKAGE = "torch_npu/__init__.py"
# where its Python reads its own dtypes (torch_npu.<dtype>) and where torchair maps their numbers to GE types
TORCH_NPU_META = "torch_npu/op_plugin/meta/_meta_registrations.py"
TORCH_NPU_GE_TYPES = "torch_npu/dynamo/torchair/ge/_ge_graph.py"
TORCH_NPU_DEVICE_MODULE = ("torch_npu/npu/__init__.py", "torch_npu/npu/streams.py", "torch_npu/npu/utils.py",
                           "torch_npu/npu/memory.py", "torch_npu/npu/graphs.py")
TORCH_NPU = Source("torch-npu", "2.10.0.post4", "torch_npu-2.10.0.post4-cp311-cp311-manylinux_2_28_x86_64.whl",
                   (TORCH_NPU_SCHEMAS, TORCH_NPU_DOCS, TORCH_NPU_PACKAGE, TORCH_NPU_META, TORCH_NPU_GE_TYPES,
                    *TORCH_NPU_DEVICE_MODULE))
SOURCES = (*VLLM_ASCENDS.values(), TORCH_NPU)


def vllm_ascend_for(vllm_version: str) -> Source:
    """The vllm-ascend release built for this vLLM version ("0.23.0+cpu" -> 0.23.0.post1)."""
    major_minor = ".".join(vllm_version.split(".")[:2])
    if major_minor not in VLLM_ASCENDS:
        raise RuntimeError(f"no vllm-ascend release is built for vLLM {vllm_version} (these are: "
                           f"{', '.join(f'{s.version} for vLLM {v}' for v, s in VLLM_ASCENDS.items())})")
    return VLLM_ASCENDS[major_minor]


# What vllm-ascend's setup.py (gen_build_info) writes for SOC_VERSION=ascend910b1, the A2 of its Dockerfile.
BUILD_INFO = "vllm_ascend/_build_info.py"
BUILD_INFO_TEXT = "# Auto-generated file\n__device_type__ = 'A2'\n"


def fetch(source: Source) -> Path:
    """Unpack ``source``'s members into its folder, once; returns the folder."""
    if not all(source.path(m.rstrip("/")).exists() for m in source.members):
        _download(source)
    if source.project == "vllm-ascend" and not source.path(BUILD_INFO).exists():
        source.path(BUILD_INFO).write_text(BUILD_INFO_TEXT)
    return source.folder


def _download(source: Source) -> None:
    url, sha256 = _index_entry(source)
    data = urllib.request.urlopen(url, timeout=600).read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{url}: sha256 differs from the index's {sha256}")
    partial = source.folder.with_name(source.folder.name + ".partial")
    if source.filename.endswith(".tar.gz"):
        _unpack_sdist(data, source.members, partial)
    else:
        _unpack_wheel(data, source.members, partial)
    shutil.rmtree(source.folder, ignore_errors=True)  # an older unpacking with fewer members
    partial.rename(source.folder)


def _wanted(name: str, members) -> bool:
    return any(name == m or (m.endswith("/") and name.startswith(m)) for m in members)


def _unpack_sdist(data: bytes, members, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as sdist:
        root = sdist.getnames()[0].split("/")[0]
        chosen = []
        for member in sdist.getmembers():
            name = member.name[len(root) + 1:]
            if (member.isfile() or member.isdir()) and _wanted(name, members):
                member.name = name
                chosen.append(member)
        sdist.extractall(into, members=chosen, filter="data")


def _unpack_wheel(data: bytes, members, into: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        wheel.extractall(into, members=[n for n in wheel.namelist() if _wanted(n, members)])


def _index_entry(source: Source) -> tuple[str, str]:
    """(URL, sha256) of the distribution file, from the registry's JSON simple index (PEP 691)."""
    request = urllib.request.Request(f"{SIMPLE_INDEX}/{source.project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    for entry in json.load(urllib.request.urlopen(request, timeout=60))["files"]:
        if entry["filename"] == source.filename:
            return entry["url"], entry["hashes"]["sha256"]
    raise RuntimeError(f"{source.project} {source.version}: no {source.filename} on {SIMPLE_INDEX}")


if __name__ == "__main__":
    for source in SOURCES:
        print(fetch(source), file=sys.stderr)
