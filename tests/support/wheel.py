"""fcpass as a user installs it: the wheel ``pip install .`` builds, installed into a virtualenv of its own.

The wheel is built from a copy of the tracked tree, as pip builds it (no build isolation: setuptools is in the
test environment). The virtualenv sees the test environment's packages (torch, vLLM) through a path line in a
``.pth`` file, which adds that directory and nothing else: that environment's editable fcpass (its own
``.pth``, pointing at this checkout) is not processed, so ``import fcpass`` there finds the wheel's copy.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def build(into: pathlib.Path) -> pathlib.Path:
    """The wheel of the tracked tree, built in ``into``."""
    source = into / "source"
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(into), str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"building the wheel failed:\n{done.stderr[-3000:]}")
    (wheel,) = into.glob("fcpass-*.whl")
    return wheel


def installed(folder: pathlib.Path, wheel: pathlib.Path) -> str:
    """A new virtualenv at ``folder`` with ``wheel`` installed (no index: its one dependency, torch, is there);
    returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = str(folder / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(purelib, "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"installing the wheel failed:\n{done.stderr[-3000:]}")
    return python
