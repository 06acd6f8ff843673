"""The README's quickstart, as a user copies it, against the vLLM under test (0.31 and 0.32 in their virtualenvs,
0.34 in the newest, vLLM 0.23 and 0.30 on the Ascend stacks).

Each ``vllm serve`` command goes through vLLM's engine-argument parser, as ``vllm serve`` parses it (so a
field this vLLM rejects fails here), then into vLLM's config with fcpass's plugin registered, which installs
the pass from the command's ``--additional-config``: the pass vLLM would run carries the command's fcpass
config, and no check of fcpass's refuses it. The Python block runs with vLLM's ``LLM`` building its engine
config from the block's arguments (the engine itself starts in the demo and the engine tests). The CPU command
is the one test_vllm_serve.py serves.
"""

from __future__ import annotations

import json
import shlex

import pytest

from support import docs

QUICKSTART = docs.section("Quickstart")
SERVE_COMMANDS = [block for block in docs.blocks(QUICKSTART, "bash") if block.startswith("vllm serve MODEL ")]


def serve_arguments(command: str) -> list[str]:
    """A README ``vllm serve MODEL ...`` command's arguments, MODEL given as ``--model``."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["vllm", "serve", "MODEL"], words
    return ["--model", "MODEL", *words[3:]]


def engine_args(arguments: list[str]):
    """vLLM's engine arguments, parsed as ``vllm serve`` parses them (its parser adds the API server's own)."""
    from vllm.engine import arg_utils

    parser = arg_utils.AsyncEngineArgs.add_cli_args(arg_utils.FlexibleArgumentParser())
    return arg_utils.AsyncEngineArgs.from_cli_args(parser.parse_args(arguments))


def _installed_pass(vllm_config):
    from fcpass.vllm.compilation import pass_key

    return (vllm_config.compilation_config.inductor_compile_config or {}).get(pass_key())


def test_the_quickstart_has_a_serve_command_per_deployment():
    assert len(SERVE_COMMANDS) == 3  # Ascend, NVIDIA, CPU
    assert len(docs.blocks(QUICKSTART, "python")) == 1


@pytest.mark.parametrize("command", SERVE_COMMANDS, ids=["ascend", "nvidia", "cpu"])
def test_each_serve_command_is_accepted_and_installs_the_pass_it_asks_for(command):
    import fcpass
    from fcpass.vllm import plugin
    from vllm.config import VllmConfig

    args = engine_args(serve_arguments(command))
    plugin.register()
    vllm_config = VllmConfig(compilation_config=args.compilation_config, additional_config=args.additional_config)
    flashcomm = _installed_pass(vllm_config)
    assert flashcomm is not None and flashcomm.config == fcpass.PassConfig.from_dict(args.additional_config["fcpass"])
    # the pass carries the entry; the config vLLM's platform reads has none (vllm-ascend 0.30 forbids unknown keys)
    assert "fcpass" not in vllm_config.additional_config


PYTHON_BLOCKS = {"README quickstart": docs.blocks(QUICKSTART, "python")[0],
                 "REFERENCE use with vLLM": docs.blocks(docs.section("Use with vLLM", docs.REFERENCE), "python")[0]}


@pytest.mark.parametrize("where", PYTHON_BLOCKS)
def test_each_python_block_builds_vllms_config_with_the_pass(monkeypatch, tmp_path, where):
    import vllm
    from devtools import engine
    from vllm.engine.arg_utils import EngineArgs

    model = engine.write_tiny_llama(str(tmp_path / "model"))
    built = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: built.append(EngineArgs(**kwargs).create_engine_config()))
    exec(compile(PYTHON_BLOCKS[where], where, "exec"), {"MODEL": model})
    (vllm_config,) = built
    assert _installed_pass(vllm_config).config.sequence_parallel


def test_the_cpu_command_is_the_one_the_serve_test_serves():
    from support.engine_expectations import FCPASS

    words = serve_arguments(SERVE_COMMANDS[2])
    assert words[words.index("--tensor-parallel-size") + 1] == "2"
    assert json.loads(words[words.index("--additional-config") + 1]) == {"fcpass": FCPASS}
