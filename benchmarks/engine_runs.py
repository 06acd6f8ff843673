"""One engine process of benchmarks/engine.py: ``vllm.LLM`` at TP=2, every point timed, the result as one line.

    python -m benchmarks.engine_runs MODEL_DIR --plan JSON [--fcpass JSON]

The plan (benchmarks/engine.py ``plan()``) lists the calls to time: each a
set of prompts and a ``max_tokens`` (1: the prefill alone), greedy with
``ignore_eos`` so every call does the same work. Per call: one warm-up,
``repeats`` timed calls, then one more under ``torch.profiler`` in each
worker (started and stopped through ``LLM.collective_rpc``; the worker runs
the model on the thread that serves the RPC), which gives the collectives'
own time (:func:`comm_op`) and the fused ops' decisions of that call.
Progress lines go to stderr with :data:`PROGRESS_MARK` so the parent can
relay them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from devtools import engine

PROGRESS_MARK = "ENGINE_BENCH "
# Ops whose self time is the worker waiting on communication: the functional collectives (gloo engine) and their
# waits, c10d's own ops (fcpass's point-to-point exchange), vLLM's shared-memory all_reduce (shm engine), and
# fcpass's fused ops, whose waits on in-flight transfers (``Work.wait``, no profiler event) count in their self time
# (their matmul chunks are child events). gloo's own thread events ("gloo:...") are excluded: the transfer
# they time is what the main thread's wait already counts where it is not hidden.
COMM_PREFIXES = ("_c10d_functional::", "c10d::", "_C::shm_", "fcpass::")
# The profiler lives on the worker object: vLLM pickles these functions by value when they come from the
# ``__main__`` module (this one, run with -m), so a module global would not outlive one call.
PROFILER_ATTRIBUTE = "_engine_bench_profiler"


def comm_op(name: str) -> bool:
    return name.startswith(COMM_PREFIXES)


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


def progress(message: str) -> None:
    print(PROGRESS_MARK + message, file=sys.stderr, flush=True)


def _seconds(llm, prompts, params) -> float:
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def time_call(llm, call: dict, repeats: int) -> dict:
    """One call of the plan: warm-up, ``repeats`` timed, one profiled; times in ms."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=engine.prompt_ids(n, salt)) for salt, n in enumerate(call["prompts"])]
    params = SamplingParams(temperature=0, max_tokens=call["max_tokens"], ignore_eos=True)
    _seconds(llm, prompts, params)
    samples = [1000 * _seconds(llm, prompts, params) for _ in range(repeats)]
    llm.collective_rpc(engine._reset_decisions)
    llm.collective_rpc(_profile_start)
    profiled = 1000 * _seconds(llm, prompts, params)
    comm = llm.collective_rpc(_profile_stop)
    return {**call, "samples_ms": samples, "median_ms": statistics.median(samples), "profiled_ms": profiled,
            "comm_ms_by_op": comm, "decisions": llm.collective_rpc(engine._decisions)}


def run(model_dir: str, plan: dict, pass_config=None) -> dict:
    start = time.perf_counter()
    llm = engine.make_llm(model_dir, pass_config, **plan["engine_args"])
    started = time.perf_counter()
    progress(f"engine started in {started - start:.0f} s")
    calls = []
    for call in plan["calls"]:
        calls.append(time_call(llm, call, call["repeats"]))
        progress(f"{call['name']}: {calls[-1]['median_ms']:.1f} ms (median of {call['repeats']})")
    result = {"calls": calls, "reports": llm.collective_rpc(engine._reports),
              "all_reduce": llm.collective_rpc(engine._all_reduce_kernel), "start_s": started - start,
              "measure_s": time.perf_counter() - started}
    del llm
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--plan", required=True, help="the calls to time and the engine's arguments, as JSON")
    parser.add_argument("--fcpass", help="PassConfig fields as JSON; without it the engine runs without fcpass")
    args = parser.parse_args(argv)
    import fcpass

    pass_config = fcpass.PassConfig.from_dict(json.loads(args.fcpass)) if args.fcpass else None
    result = run(args.model_dir, json.loads(args.plan), pass_config)
    print(engine.RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
