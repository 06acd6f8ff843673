"""One vLLM engine process, every call of a plan timed: the child ``python -m fcpass.compare`` (and the
checkout's engine benchmark) start once without fcpass and once with it.

    python -m fcpass.engine_run --model MODEL --plan JSON [--fcpass JSON]

The plan: ``engine_args`` (``vllm.LLM``'s keyword arguments: the user's deployment), ``calls`` (each a list of
prompt lengths, a ``max_tokens`` (1: the prefill alone) and ``repeats``; greedy with ``ignore_eos``, so every
call does the same work), ``profile`` (one more call under ``torch.profiler`` in each worker, for the
collectives' own time, :func:`comm_op`) and ``readers`` (more ``module:function`` names each worker answers
at the end). Per call: one warm-up, ``repeats`` timed calls, then the greedy ids, and each worker's fused-op
decisions of one call (``LLM.collective_rpc``, which takes these functions by pickle: the parent sets
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for this local engine). The result is one line on stdout after
:data:`RESULT_MARK`; progress goes to stderr after :data:`PROGRESS_MARK`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

RESULT_MARK = "FCPASS_ENGINE_RESULT "
PROGRESS_MARK = "FCPASS_ENGINE_PROGRESS "
# Prompt token ids stay below this: every model's vocabulary is larger (the random checkpoints' is 1024)
PROMPT_VOCAB = 1024
# Ops whose self time is the worker waiting on communication: the functional collectives and their waits, c10d's
# own ops (fcpass's point-to-point exchange), vLLM's CPU shared-memory all_reduce, and fcpass's fused ops, whose
# waits on in-flight transfers (``Work.wait``, no profiler event) count in their self time (their matmul chunks
# are child events). gloo's own thread events ("gloo:...") are excluded: the transfer they time is what the main
# thread's wait already counts where it is not hidden.
COMM_PREFIXES = ("_c10d_functional::", "c10d::", "_C::shm_", "fcpass::")
# The profiler lives on the worker object: vLLM pickles these functions by value when they come from the
# ``__main__`` module (this one, run with -m), so a module global would not outlive one call.
PROFILER_ATTRIBUTE = "_fcpass_engine_profiler"


def prompt_ids(length: int, salt: int = 0) -> list[int]:
    """A fixed prompt of ``length`` token ids (no tokenizer needed), different per ``salt``."""
    return [(7 * salt + 13 * j) % (PROMPT_VOCAB - 1) + 1 for j in range(length)]


def comm_op(name: str) -> bool:
    return name.startswith(COMM_PREFIXES)


# --------------------------------------------------------------------------- what each worker answers

def reset_decisions(worker) -> None:
    import fcpass

    fcpass.reset_decision_counts()


def decisions(worker) -> dict:
    """{"op/path": calls} of this worker's fused ops since :func:`reset_decisions`."""
    import fcpass

    counts: dict[str, int] = {}
    for (op, path, _), n in fcpass.decision_counts().items():
        counts[f"{op}/{path}"] = counts.get(f"{op}/{path}", 0) + n
    return counts


def reports(worker) -> list:
    """The rows of the pass's reports in this worker (none where its graph came from the compile cache)."""
    from passes.flashcomm import recent_reports

    return [report.rows() for report in recent_reports()]


def _profile_start(worker) -> None:
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU])
    setattr(worker, PROFILER_ATTRIBUTE, profiler)
    profiler.start()


def _profile_stop(worker) -> dict:
    """{op: self ms} of the communication ops since :func:`_profile_start`, in this worker."""
    profiler = getattr(worker, PROFILER_ATTRIBUTE)
    profiler.stop()
    delattr(worker, PROFILER_ATTRIBUTE)
    return {event.key: event.self_cpu_time_total / 1000 for event in profiler.key_averages()
            if comm_op(event.key)}


def _reader(name: str):
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


# --------------------------------------------------------------------------- the engine process

def progress(message: str) -> None:
    print(PROGRESS_MARK + message, file=sys.stderr, flush=True)


def _generate(llm, prompts, params):
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def time_call(llm, call: dict, profile: bool) -> dict:
    """One call of the plan: warm-up, ``repeats`` timed, one for the decisions (profiled with ``profile``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=prompt_ids(n, salt)) for salt, n in enumerate(call["prompts"])]
    params = SamplingParams(temperature=0, max_tokens=call["max_tokens"], ignore_eos=True)
    _generate(llm, prompts, params)
    samples = [1000 * _generate(llm, prompts, params)[0] for _ in range(call["repeats"])]
    llm.collective_rpc(reset_decisions)
    if profile:
        llm.collective_rpc(_profile_start)
    seconds, outputs = _generate(llm, prompts, params)
    timed = {**call, "samples_ms": samples, "median_ms": statistics.median(samples),
             "ids": [list(o.outputs[0].token_ids) for o in outputs], "decisions": llm.collective_rpc(decisions)}
    if profile:
        timed.update(profiled_ms=1000 * seconds, comm_ms_by_op=llm.collective_rpc(_profile_stop))
    return timed


def run(model: str, plan: dict, pass_fields: dict | None = None) -> dict:
    """``vllm.LLM(model, **plan["engine_args"])``, with fcpass's pass when ``pass_fields`` is given (a dict of
    PassConfig fields: ``fcpass.vllm.compilation_config`` builds vLLM's config from it), every call timed."""
    from vllm import LLM

    import fcpass.vllm

    kwargs = dict(plan.get("engine_args", {}))
    if pass_fields is not None:
        kwargs["compilation_config"] = fcpass.vllm.compilation_config(pass_fields, kwargs.get("compilation_config"))
    start = time.perf_counter()
    llm = LLM(model=model, **kwargs)
    started = time.perf_counter()
    progress(f"engine started in {started - start:.0f} s")
    calls = []
    for call in plan["calls"]:
        calls.append(time_call(llm, call, plan.get("profile", False)))
        progress(f"{call['name']}: {calls[-1]['median_ms']:.1f} ms (median of {call['repeats']})")
    result = {"calls": calls, "reports": llm.collective_rpc(reports), "start_s": started - start,
              "measure_s": time.perf_counter() - started,
              "readers": {name: llm.collective_rpc(_reader(name)) for name in plan.get("readers", ())}}
    del llm
    return result


# --------------------------------------------------------------------------- the parent's side

def run_process(label: str, model: str, plan: dict, pass_fields: dict | None, timeout: float,
                env: dict | None = None) -> dict:
    """This module in a new process (``env`` added to this one's) in a process group of its own, so that killing
    the group also stops vLLM's engine core and workers; its progress logged under ``label``; its result, or an
    error with the end of its stderr (also at the deadline, when the group is killed)."""
    args = ["--model", model, "--plan", json.dumps(plan)]
    if pass_fields is not None:
        args += ["--fcpass", json.dumps(pass_fields)]
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "fcpass.engine_run", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    tail, stdout = collections.deque(maxlen=400), []
    readers = [threading.Thread(target=_relay, args=(process.stderr, tail, label), daemon=True),
               threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise TimeoutError(f"{label}: no result within {timeout:.0f} s:\n{''.join(tail)[-4000:]}") from None
    finally:
        _kill_group(process)  # the engine's stragglers
    for reader in readers:
        reader.join(timeout=30)
    return parse_result(process.returncode, "".join(stdout), "".join(tail))


def _relay(stream, tail, label: str) -> None:
    for line in stream:
        tail.append(line)
        if line.startswith(PROGRESS_MARK):
            logger.info("  %s: %s", label, line[len(PROGRESS_MARK):].rstrip())


def _kill_group(process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def parse_result(returncode: int, stdout: str, stderr: str) -> dict:
    """The last result line of a finished run, or an error with the end of its stderr."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if returncode != 0 or not lines:
        raise RuntimeError(f"engine run failed (exit code {returncode}):\n{stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="what vllm.LLM(model=...) takes: a folder or a model name")
    parser.add_argument("--plan", required=True, help="the calls to time and the engine's arguments, as JSON")
    parser.add_argument("--fcpass", help="PassConfig fields as JSON; without it the engine runs without fcpass")
    args = parser.parse_args(argv)
    result = run(args.model, json.loads(args.plan), json.loads(args.fcpass) if args.fcpass else None)
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
