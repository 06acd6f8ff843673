"""vLLM's real engine on a CPU machine: ``vllm.LLM(tensor_parallel_size=2)`` with and without fcpass.

What it takes here (docs/VLLM_CPU.md, "The real engine"): a tiny random
Llama checkpoint written with transformers (no download), the CPU KV cache
capped (``VLLM_CPU_KVCACHE_SPACE=1``), one core per worker
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``). The compile caches stay as users
have them (on). vLLM compiles the model with torch's AOT compile and keeps
the result under ``VLLM_CACHE_ROOT`` (Inductor's cache dir moved inside it);
a start that loads it runs the cached graph, whose fused ops carry their
config, without running the pass (no report then). vLLM 0.31 and 0.32 on CPU
fail to load their own artifact ("'function' object has no attribute
'finalize_loading'", with or without fcpass) and compile again, so there
every start runs the pass. fcpass comes in as a user turns it on:
``compilation_config=fcpass.vllm.compilation_config(PassConfig(...))``.

On vLLM's CPU backend the whole model is one graph for every token count
(no compile ranges): its all_reduces are ``_c10d_functional.all_reduce`` on
the TP group's c10d name, its norms aten math, its linears
``auto_functionalized(_C.onednn_mm)`` with a packed-weight handler. The
sequence-parallel split therefore applies to every batch size or to none:
``sequence_parallel_threshold_tokens`` below 2 (the symbolic size's lower
bound) turns it on; the fused ops' guard still decides per call.

Each worker's decisions and the pass's reports are read with vLLM's own
``LLM.collective_rpc``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fcpass.checks import checkpoints
from fcpass.checks.checkpoints import HIDDEN, LAYERS
from fcpass.engine_run import RESULT_MARK, decisions, parse_result, prompt_ids, reports, reset_decisions

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    # collective_rpc with a function (this module's readers) needs vLLM's pickle fallback; local engine only
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
PROMPT_LENGTHS = (5, 40, 100)  # below and above the demo's threshold of 16 tokens
# vllm.LLM's arguments for the random fp32 checkpoints here (max_model_len: make_llm's default, a plan's own)
ENGINE_ARGS = {"tensor_parallel_size": 2, "skip_tokenizer_init": True, "seed": 0, "dtype": "float32",
               "enable_prefix_caching": False}


def write_tiny_llama(path: str, seed: int = 0) -> str:
    """A random Llama checkpoint (safetensors) at ``path``; initializer 0.2 keeps greedy ids off near-ties."""
    return write_llama(path, HIDDEN, LAYERS, seed=seed)


def write_llama(path: str, hidden: int, layers: int, max_positions: int = 1024, seed: int = 0) -> str:
    """A random fp32 Llama of the tiny one's proportions (heads of 64, half as many kv heads, intermediate
    2 x hidden, vocab 1024) at ``path``, unless one is there; benchmarks scale it by hidden size and layers."""
    return checkpoints.write(path, "llama", hidden, layers, max_positions, seed)


def run_engine(model_dir: str, pass_config=None, prompt_lengths=PROMPT_LENGTHS, max_tokens: int = 8) -> dict:
    """Start ``vllm.LLM`` at TP=2 (with FlashCommPass when ``pass_config`` is given) and run the prompts.

    Returns {"ids": greedy ids per prompt, "decisions": per prompt, each worker's fused/unfused counts of
    that prompt's prefill, "reports": each worker's pass reports, each a list of (family, form, outcome)
    rows (none where the compiled graph came from the compile cache), "all_reduce": each worker's
    all_reduce kernel ("shm" where vLLM loaded a kernel library with it, else "c10d_functional"),
    "compile_cache": each worker's cache counts (:func:`_compile_cache_counts`), "start_s", "generate_s"}.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = make_llm(model_dir, pass_config)
    started = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=prompt_ids(n, i)) for i, n in enumerate(prompt_lengths)]
    per_prompt = []
    for prompt in prompts:  # one prefill at a time (max_tokens=1: no decode step), its decisions per worker
        llm.collective_rpc(reset_decisions)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        per_prompt.append(llm.collective_rpc(decisions))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    finished = time.perf_counter()
    result = {"ids": [list(o.outputs[0].token_ids) for o in outputs], "decisions": per_prompt,
              "reports": llm.collective_rpc(reports), "all_reduce": llm.collective_rpc(all_reduce_kernel_of),
              "compile_cache": llm.collective_rpc(_compile_cache_counts),
              "start_s": started - start,
              "generate_s": finished - started}
    del llm
    return result


def make_llm(model_dir: str, pass_config=None, **engine_args):
    """``vllm.LLM`` at TP=2 on this CPU (:data:`ENGINE_ENV` set), with FlashCommPass when ``pass_config`` is
    given; ``engine_args`` add to or override the engine's (max_model_len 512 unless given)."""
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    kwargs = {**ENGINE_ARGS, "max_model_len": 512, **engine_args}
    if pass_config is not None:
        import fcpass.vllm

        kwargs["compilation_config"] = fcpass.vllm.compilation_config(pass_config)
    return LLM(model=model_dir, **kwargs)


def _compile_cache_counts(worker) -> dict:
    """What this worker's compile caches served: vLLM's AOT-compiled model loaded or compiled and saved
    ("vllm/aot_artifacts_loaded", "vllm/aot_compiles"), Inductor's and AOTAutograd's hits and misses."""
    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    counts = {f"{group}/{name}": n for group in ("inductor", "aot_autograd") for name, n in counters[group].items()
              if "cache" in name}
    counts["vllm/aot_artifacts_loaded"] = compilation_counter.num_aot_artifacts_loaded
    counts["vllm/aot_compiles"] = compilation_counter.num_aot_compiles
    return counts


def all_reduce_kernel_of(worker) -> str:
    from devtools.kernels import all_reduce_kernel

    return all_reduce_kernel()


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_checkout_on_path(env: dict) -> dict:
    """``env`` with this checkout first on PYTHONPATH: devtools is not installed, and vLLM's workers import
    this module's readers by name."""
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)}


def start(model_dir: str, fcpass_fields: dict | None = None, prompt_lengths=PROMPT_LENGTHS, env=None,
          architecture: str = "llama"):
    """``python -m devtools.engine`` in a new process (one engine per process, ``env`` added to this one's) on
    a random ``architecture`` checkpoint at ``model_dir`` (fcpass/checks/checkpoints.py); pass it to :func:`result`."""
    args = [model_dir, "--prompt-lengths", ",".join(map(str, prompt_lengths)), "--architecture", architecture]
    if fcpass_fields is not None:
        args += ["--fcpass", json.dumps(fcpass_fields)]
    return start_module("devtools.engine", args, env)


def start_module(module: str, args, env=None):
    """``python -m module args`` in a new process of this checkout (``env`` added to this one's), its stdout
    and stderr piped; its result line is read by :func:`result`."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=with_checkout_on_path({**os.environ, **(env or {})}))


def result(process, timeout: float) -> dict:
    """The run's result, or an error with the end of its stderr; the process is killed at the deadline."""
    import subprocess

    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise TimeoutError(f"engine run did not finish within {timeout:.0f} s") from None
    return parse_result(process.returncode, stdout, stderr)


def run_both(model_dir: str, fcpass_fields: dict, prompt_lengths, timeout: float = 480, env=None,
             architecture: str = "llama") -> dict:
    """The engine without and with fcpass, side by side (most of a start is waiting, not computing)."""
    return run_all(model_dir, {"plain": (None, env), "fcpass": (fcpass_fields, env)}, prompt_lengths, timeout,
                   architecture)


def run_all(model_dir: str, engines: dict, prompt_lengths, timeout: float = 480, architecture: str = "llama") -> dict:
    """Every engine of ``engines`` ({name: (fcpass fields or None, env additions or None)}) at once, on the
    ``architecture`` checkpoint at ``model_dir`` (written first, once); their results by name."""
    checkpoints.write(model_dir, architecture)
    processes = {name: start(model_dir, fields, prompt_lengths, env, architecture)
                 for name, (fields, env) in engines.items()}
    try:
        return {name: result(process, timeout) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()


def main(argv=None) -> None:
    """One engine run in this process, its result as one JSON line (tests and the demo start one per run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--fcpass", help="PassConfig fields as JSON; without it the engine runs without fcpass")
    parser.add_argument("--prompt-lengths", default=",".join(map(str, PROMPT_LENGTHS)))
    parser.add_argument("--architecture", default="llama", choices=sorted(checkpoints.ARCHITECTURES))
    args = parser.parse_args(argv)
    import fcpass

    pass_config = fcpass.PassConfig.from_dict(json.loads(args.fcpass)) if args.fcpass else None
    lengths = tuple(int(n) for n in args.prompt_lengths.split(","))
    result = run_engine(checkpoints.write(args.model_dir, args.architecture), pass_config, lengths)
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
