"""fcpass's user tools as a user runs them: from the wheel installed in a virtualenv of its own, started in a
folder away from the checkout (tests/support/wheel.py), each as its console script and as ``python -m``.

``fcpass-compare`` runs vLLM's real engine (the CPU one: TP=2 on the tiny random Llama, vLLM's AVX2 build, so
that the all_reduces go over gloo and fcpass's showcase config fuses) without and with fcpass, one after the
other, from that virtualenv; the Ascend check, without torch_npu, says so and runs nothing.
"""

import json
import os
import subprocess
import tomllib

import pytest

from devtools import engine
from devtools.kernels import avx2_env
from support.engine_expectations import FCPASS, fused_ops_per_prefill

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]


@pytest.fixture(scope="module")
def user(tmp_path_factory, installed_wheel):
    """(the installed virtualenv's bin folder, the user's folder, an environment without the checkout)."""
    folder = tmp_path_factory.mktemp("user")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return os.path.dirname(installed_wheel), str(folder), env


def _where(user, command, env=None) -> dict:
    """How ``command`` (its first word a program of the installed virtualenv) runs as the user runs it."""
    bin_dir, folder, user_env = user
    return {"args": [os.path.join(bin_dir, command[0]), *command[1:]], "cwd": folder,
            "env": {**user_env, **(env or {})}, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def _start(user, command) -> subprocess.Popen:
    return subprocess.Popen(**_where(user, command))


def _run(user, command, timeout=120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(**_where(user, command, env), timeout=timeout)


def test_every_tool_runs_as_its_script_and_as_python_m(user):
    """Each console script answers --help; each is the ``main`` of a module ``python -m`` runs (it has a
    ``__main__`` guard calling that main)."""
    assert set(SCRIPTS) == {"fcpass-calibrate", "fcpass-replay", "fcpass-compare", "fcpass-ascend-check",
                            "fcpass-gpu-check"}
    started = [(script, _start(user, [script, "--help"])) for script in SCRIPTS]  # at once: each mostly imports torch
    for script, process in started:
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0 and "usage:" in stdout, (script, stderr[-2000:])
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({t: importlib.util.find_spec(t.split(':')[0]).origin for t in json.loads(sys.argv[1])}))")
    done = _run(user, ["python", "-c", probe, json.dumps(list(SCRIPTS.values()))])
    assert done.returncode == 0, done.stderr[-2000:]
    venv = os.path.dirname(user[0])
    for target, origin in json.loads(done.stdout).items():
        assert origin.startswith(venv), (target, origin)  # the wheel's copy, not the checkout's
        source, function = open(origin).read(), target.split(":")[1]
        assert f"def {function}(" in source and source.rstrip().endswith(f'if __name__ == "__main__":\n    '
                                                                         f'sys.exit({function}())'), target


def test_the_ascend_check_without_torch_npu_says_so_and_runs_nothing(user):
    done = _run(user, ["fcpass-ascend-check"])
    assert done.returncode == 2 and "torch_npu is not installed" in done.stderr, done.stderr[-2000:]


def test_compare_refuses_a_bad_pass_config_before_starting_an_engine(user):
    done = _run(user, ["fcpass-compare", "--model", "unused", "--fcpass", '{"threshold_tokens": "many"}'])
    assert done.returncode == 2 and "--fcpass: " in done.stderr and "threshold_tokens" in done.stderr, (
        done.stderr[-2000:])
    assert "starting the engine" not in done.stderr


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_compare_runs_the_engine_without_and_with_fcpass(user, tmp_path):
    model = engine.write_tiny_llama(str(tmp_path / "tiny-llama"))
    out = tmp_path / "compare.json"
    engine_args = {"tensor_parallel_size": 2, "dtype": "float32", "max_model_len": 128}
    done = _run(user, ["fcpass-compare", "--model", model, "--fcpass", json.dumps(FCPASS), "--engine-args",
                       json.dumps(engine_args), "--prompt-tokens", "5,40", "--batch", "2", "--decode-steps", "4",
                       "--repeats", "1", "--json", str(out)], timeout=840,
                env={**engine.ENGINE_ENV, **avx2_env()})  # the session's compile caches, as other engines use them
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [p["point"] for p in result["points"]] == ["prefill 5", "prefill 40", "decode step, batch 2"]
    assert all(p["without_ms"] > 0 and p["with_ms"] > 0 for p in result["points"]), result["points"]
    assert result["greedy_tokens_equal"] and "greedy tokens the same: yes" in done.stdout, done.stdout
    # above the threshold (the 40-token prefill) the fused path ran, at and below it the unfused one
    fused = fused_ops_per_prefill("c10d_functional", "fused")
    assert len(result["decisions_per_worker"]) == 2
    for counts in result["decisions_per_worker"]:
        assert {key: n for key, n in counts.items() if key.endswith("/fused")} == fused, counts
        assert all(counts.get(key.replace("/fused", "/unfused"), 0) > 0 for key in fused), counts
    assert all(call["decisions"] == [{}, {}] for call in result["runs"]["without fcpass"]["calls"])
    assert result["engine_args"] == {"seed": 0, "enable_prefix_caching": False, "skip_tokenizer_init": True,
                                     **engine_args}


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(tool module, arguments) of each command in the README's "Tools" blocks."""
    import shlex

    from support import docs

    found = []
    for block in docs.blocks(docs.section("Tools"), "bash"):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            if words[0] in SCRIPTS:
                found.append((SCRIPTS[words[0]].split(":")[0], words[1:]))
            else:  # torchrun ... -m MODULE ARGS, or python -m MODULE ARGS
                at = words.index("-m")
                found.append((words[at + 1], words[at + 2:]))
    return found


def test_the_readmes_tool_commands_are_accepted_by_their_tools(monkeypatch):
    """Each command of the README's "Tools" section parses with its tool's own arguments (the launcher's
    environment set, as torchrun sets it for --launched), and its fcpass config is a PassConfig; the table lists
    every installed command."""
    import importlib

    import fcpass
    from support import docs

    commands = _readme_commands()
    assert {module for module, _ in commands} == {"fcpass.compare", "fcpass.calibrate", "fcpass.checks.ascend",
                                                 "fcpass.checks.gpu"}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    for module_name, arguments in commands:
        module = importlib.import_module(module_name)
        args = module.parse_args(arguments) if hasattr(module, "parse_args") else module.parser().parse_args(arguments)
        if module_name == "fcpass.compare":
            fcpass.PassConfig.from_dict(args.fcpass)
    table = docs.section("Tools").split("\n\n")[2]
    for script, target in SCRIPTS.items():
        assert f"| `{script}` | `{target.split(':')[0]}` |" in table, script
