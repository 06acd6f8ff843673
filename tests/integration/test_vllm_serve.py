"""The CLI path: ``vllm serve`` at TP=2 on 127.0.0.1, fcpass from ``--additional-config`` through the plugin.

Two servers side by side on the tiny random Llama (devtools/engine.py), one
with ``--additional-config '{"fcpass": {...}}'`` (the ``vllm.general_plugins``
entry point installs FlashCommPass from it in every vLLM process), one
without. The fcpass server runs fcpass as a user installs it: the wheel
``pip install .`` builds, in a virtualenv of its own, started outside the
checkout (tests/support/wheel.py). Queried with the ``openai`` client: completions from prompt token
ids (no tokenizer), temperature 0, prompts below and above the threshold.
The fcpass server's workers dump their pass reports (FCPASS_DUMP_GRAPHS), so
the test also sees that the pass ran and fused (tests/support/engine_expectations.py),
in the all_reduce form of the kernels vLLM loaded (tests/support/vllm_kernels.py).
"""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import openai
import pytest

from devtools import servers as vllm_servers
from passes.capture import CAPTURE_ENV
from support import docs, vllm_kernels
from support.engine_expectations import FCPASS, sorted_rows, worker_report
from devtools import engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MAX_TOKENS = 8
READY_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def servers(tmp_path_factory, installed_wheel):
    tmp = tmp_path_factory.mktemp("vllm-serve")
    model_dir = engine.write_tiny_llama(str(tmp / "tiny-llama"))
    dumps = str(tmp / "fcpass-dumps")
    captures = tmp / "fcpass-captures"  # README "Testing fcpass on your model": its workers capture
    # Fresh compile caches (vLLM's holds Inductor's): the first compile is cold, so the reports show the pass.
    cache = {"VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-cache")}
    user = tmp / "user"  # where the user starts the server: no checkout there
    user.mkdir()
    python = installed_wheel
    specs = {
        "plain": ((), cache),
        "fcpass": (("--additional-config", json.dumps({"fcpass": FCPASS})),
                   {"FCPASS_DUMP_GRAPHS": dumps, CAPTURE_ENV: str(captures), **cache},
                   vllm_servers.Python(python, checkout=False, cwd=str(user))),
    }
    with vllm_servers.running(specs, model_dir, str(tmp), READY_TIMEOUT_S) as running:
        yield running, model_dir, dumps, captures, (python, str(user))
    for server in running.values():  # stopped by running(); nothing of theirs may be left behind
        assert server.process.poll() is not None, server.name


def _complete(server, model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)
    response = client.completions.create(model=model_dir, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True})
    choices = sorted(response.choices, key=lambda choice: choice.index)
    return [choice.model_extra["token_ids"] for choice in choices]


def test_served_tokens_equal_without_fcpass(servers):
    running, model_dir, _, _, _ = servers
    prompts = [engine.prompt_ids(n, i) for i, n in enumerate(engine.PROMPT_LENGTHS)]
    ids = {name: _complete(server, model_dir, prompts) for name, server in running.items()}
    assert all(len(tokens) == MAX_TOKENS for tokens in ids["plain"])
    assert ids["fcpass"] == ids["plain"]
    # One prompt per request too (each its own prefill): the same tokens again.
    singles = [_complete(running["fcpass"], model_dir, [prompt])[0] for prompt in prompts]
    assert singles == ids["plain"]


def test_plugin_installed_the_pass_in_both_workers_from_additional_config(servers):
    _, _, dumps, _, _ = servers
    last_report_per_process = {}
    for path in sorted(glob.glob(os.path.join(dumps, "flashcomm_*_report.json"))):
        pid = os.path.basename(path).split("_")[1]
        with open(path) as f:
            last_report_per_process[pid] = json.load(f)
    # Both workers compile at once; one may hit the cache entry the other just wrote (then it has no report).
    assert 1 <= len(last_report_per_process) <= 2, sorted(os.listdir(dumps)) if os.path.isdir(dumps) else dumps
    for rows in last_report_per_process.values():
        assert sorted_rows(rows) == worker_report(vllm_kernels.all_reduce_form())


def test_the_fcpass_server_ran_the_installed_wheel_not_the_checkout(servers):
    """Where the fcpass server started, its python imports fcpass, and vLLM's plugin loader finds its entry point,
    from the virtualenv the wheel went into."""
    *_, (python, user) = servers
    probe = ("import importlib.metadata as m, fcpass; "
             "(ep,) = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'fcpass']; "
             "print(fcpass.__file__); print(ep.dist.locate_file(''))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=user, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    venv = os.path.dirname(os.path.dirname(python))
    module, dist = done.stdout.split()
    assert module.startswith(venv) and dist.startswith(venv), done.stdout


def test_the_servers_own_output_says_what_fcpass_did(servers):
    """Where a user looks: the server's output (vLLM's handlers, vLLM's format) has each worker's install line
    and, per graph the pass ran on, its one-line summary (what it rewrote, what it left alone and the most
    frequent reasons), the same as the worker's dumped report; the server without fcpass says nothing of it."""
    from passes.report import PassReport

    running, _, dumps, _, _ = servers
    with open(running["fcpass"].log_path, errors="replace") as f:
        lines = f.read().splitlines()
    installed = [line for line in lines if "fcpass: FlashCommPass installed" in line]
    summaries = [line for line in lines if "FlashCommPass on graph" in line]
    assert installed and summaries, running["fcpass"].log_tail()
    assert all(" INFO " in line for line in installed), installed
    # each worker's startup line: the pass is in its compilation config, and when it runs
    startup = [line for line in lines if "fcpass: FlashCommPass is in this process's compilation config" in line]
    assert {line.split()[0] for line in startup} >= {"(Worker_TP0", "(Worker_TP1"}, startup
    assert all(" INFO " in line and "(Worker_TP" in line for line in summaries), summaries  # each worker's
    for path in glob.glob(os.path.join(dumps, "flashcomm_*_report.json")):
        with open(path) as f:
            summary = PassReport.from_rows(json.load(f)).summary()
        assert any(line.endswith(summary) for line in summaries), (summary, summaries)
    with open(running["plain"].log_path, errors="replace") as f:
        assert "FlashCommPass" not in f.read()


def test_the_readme_replays_what_the_servers_workers_captured(servers, tmp_path):
    """README "Testing fcpass on your model" as written: its serve command is this module's fcpass server
    (FCPASS_CAPTURE, a fresh cache, the same additional config); its replay command and its test file run in
    the folder the workers' captures are in."""
    _, _, _, captures, _ = servers
    text = docs.section("Testing fcpass on your model")
    serve, replay_command = docs.blocks(text, "bash")
    (user_test,) = docs.blocks(text, "python")
    assert serve.startswith("FCPASS_CAPTURE=fcpass-captures VLLM_CACHE_ROOT=$(mktemp -d) vllm serve MODEL "
                            "--tensor-parallel-size 2 "), serve
    words = shlex.split(serve.replace("\\\n", " "))
    assert json.loads(words[words.index("--additional-config") + 1]) == {"fcpass": FCPASS}
    shutil.copytree(captures, tmp_path / "fcpass-captures")
    # one graph per worker (both compile at once: one may hit the cache entry the other just wrote, no pass run)
    workers = len(list((tmp_path / "fcpass-captures").iterdir()))
    assert 1 <= workers <= 2
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(replay_command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(json.loads((tmp_path / "replayed.json").read_text())["graphs"]) == workers
    (tmp_path / "test_my_model.py").write_text(user_test)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_model.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
