"""``python -m fcpass.replay`` as a CI machine runs it: a fresh process in which ``import vllm``,
``import vllm_ascend`` and ``import torch_npu`` fail; and the committed captures (tests/data/captures), which
``make captures`` regenerates."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "captures"
UPDATE_ENV = "FCPASS_UPDATE_CAPTURES"  # set by `make captures`: the tests that capture write tests/data too
WITHOUT_LIBRARIES = ("import sys, runpy; sys.modules.update(vllm=None, vllm_ascend=None, torch_npu=None); "
                     "sys.argv[0] = 'fcpass.replay'; runpy.run_module('fcpass.replay', run_name='__main__')")


def replay(folder, *args, timeout: float = 300, first: str = "") -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the replay CLI on ``folder`` without vLLM, vllm-ascend and torch_npu (``first``: Python run before
    it in that process); (the process, its --json)."""
    out = pathlib.Path(folder).parent / f"{pathlib.Path(folder).name}.replayed.json"
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", first + "\n" + WITHOUT_LIBRARIES, str(folder), "--json", str(out),
                           *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ""})
    return done, json.loads(out.read_text()) if out.is_file() else None


def gather(folders, into) -> pathlib.Path:
    """Every capture under ``folders`` (each rank may have written its own) copied into one folder."""
    into = pathlib.Path(into)
    for folder in folders:
        for capture in pathlib.Path(folder).iterdir():
            shutil.copytree(capture, into / capture.name)
    return into


def keep_if_asked(captures, name: str) -> None:
    """Under ``make captures``: ``captures`` becomes the committed test data ``name``, with its replay's results
    as the expectation the committed-data test checks."""
    if not os.environ.get(UPDATE_ENV):
        return
    target = DATA / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(captures, target)
    done, results = replay(target)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (DATA / f"{name}.expected.json").write_text(json.dumps(results, indent=1) + "\n")
    (DATA / f"{name}.replayed.json").unlink()


def torch_major_minor(version: str | None = None) -> str:
    import torch

    return ".".join((version or torch.__version__).split(".")[:2])


def torch_of(name: str) -> str:
    """The torch major.minor that wrote the committed capture ``name`` (the only one that replays it)."""
    facts = json.loads(next((DATA / name).rglob("capture.json")).read_text())
    return torch_major_minor(facts["versions"]["torch"])


def live_reports(folder) -> dict[str, list]:
    """{capture folder name: the live run's report rows} of every capture under ``folder``."""
    return {path.parent.name: json.loads(path.read_text())["report"]
            for path in sorted(pathlib.Path(folder).rglob("capture.json"))}
