"""Demo: vLLM's real engine, ``vllm.LLM(tensor_parallel_size=2)`` on CPU, without fcpass, with its defaults, and
with a config that shows the mechanism at work, side by side.

    python -m examples.demo [--kernels gloo|shm] [--threshold 16] [--prompt-lengths 5,40,100]

A tiny random Llama checkpoint (2 layers, hidden 256, fp32) is written at
startup (no download); three engines run it at once (see devtools/engine.py
for what the CPU engine needs and compiles):

- without fcpass (the reference tokens);
- ``PassConfig()``, the defaults, as a user turns fcpass on: on CPU they
  change nothing (nothing is split; matmul -> all_reduce stays on its plain
  path, where CPU cannot gain);
- the showcase (sequence parallelism from 1 token, fusion above
  ``--threshold``): the rewrite in the graph, the fused ops' guard running
  the site's own ops at or below the threshold and the fused pipeline above
  it, and the same greedy tokens. Measured slower on CPU: a demonstration.

For each it prints each worker's report (what was split and fused, why the
rest was not), the guard's decisions per prefill size, the greedy tokens
against the reference, and the times, then why CPU gains nothing.

By default the engines run vLLM's AVX2 kernel build (forced, on any x86 CPU),
whose all_reduce goes over gloo: there the split and the fusion apply.
``--kernels shm`` runs the build vLLM picks on this CPU; on AVX-512 machines
its all_reduce is vLLM's shared-memory kernel, faster than the split's
collectives, and fcpass leaves it alone (the report says so).
"""

from __future__ import annotations

import argparse
import tempfile

from devtools import engine, kernels
from passes.report import PassReport

THRESHOLD = 16


def fcpass_fields(threshold: int) -> dict:
    """The showcase: one CPU graph serves every batch size (no compile ranges), SP for all of them, fusion decided
    per call."""
    return {"threshold_tokens": threshold, "sequence_parallel": True, "sequence_parallel_threshold_tokens": 1}


def describe(fields: dict) -> str:
    if not fields:
        return "PassConfig(), the defaults"
    return f"PassConfig(**{fields}), the showcase (splits at every size; a demonstration, not a config to deploy)"


FROM_CACHE = ("no report: the compiled graph came from the compile cache, so the pass did not run in this "
              "process;\nits fused ops carry the config they were compiled with")

WHY_CPU_GAINS_NOTHING = """Why CPU gains nothing: the fused ops overlap a matmul with its communication, which needs
the communication to run beside the compute. On CPU, gloo's transport is CPU work on the same cores the matmuls
need (and vLLM's shared-memory all_reduce on AVX-512 is faster than any split), so the overlap has nothing to
hide: the showcase is measured slower here (benchmarks/README.md), and the defaults leave the graph as it was.
On NPUs and GPUs the communication runs on its own engines; that is where fcpass is meant to gain, and where it
has not been measured yet."""


def render_engine(plain: dict, fused: dict, fields: dict, prompt_lengths) -> list[str]:
    """One fcpass engine against the reference: its reports, its guard's decisions, its tokens and times."""
    reports = [PassReport.from_rows(worker[-1]) for worker in fused["reports"] if worker]
    lines = [f"\n=== fcpass: {describe(fields)}"]
    if reports:
        same = all(r.table() == reports[0].table() for r in reports)
        others = "the other the same" if same else "the other differs"
        lines += [f"What the pass did ({len(reports)} of {len(fused['reports'])} workers ran it; "
                  f"{others if len(reports) > 1 else 'the other was served from the cache'}): "
                  f"{reports[0].summary()}", reports[0].table()]
    else:
        lines += ["What the pass did: " + FROM_CACHE]
    lines += ["", f"{'prefill tokens':>14}  the fused ops' guard, per worker"]
    for n, per_worker in zip(prompt_lengths, fused["decisions"]):
        agree = all(d == per_worker[0] for d in per_worker)
        calls = ", ".join(f"{key} x{count}" for key, count in sorted(per_worker[0].items())) or "no fused op in the graph"
        lines.append(f"{n:>14}  {calls}" + ("" if agree else "  (workers disagree!)"))
    lines.append("\ngreedy tokens (without fcpass | with fcpass):")
    for n, a, b in zip(prompt_lengths, plain["ids"], fused["ids"]):
        lines.append(f"{n:>14}  {a} | {b}  {'equal' if a == b else 'DIFFERENT'}")
    lines.append(f"all greedy tokens equal: {'yes' if plain['ids'] == fused['ids'] else 'NO'}")
    lines.append(f"engine start s (without / with): {plain['start_s']:.1f} / {fused['start_s']:.1f}; "
                 f"generate s: {plain['generate_s']:.2f} / {fused['generate_s']:.2f} "
                 "(2 shared cores: timings are not a benchmark)")
    return lines


def render(results: dict, configs: dict, prompt_lengths) -> str:
    plain = results["plain"]
    lines = [f"vLLM engine, tiny random Llama ({engine.LAYERS} layers, hidden {engine.HIDDEN}, fp32), "
             f"tensor_parallel_size=2 on CPU, all_reduce kernel {plain['all_reduce'][0]}; three engines: without "
             "fcpass, with its defaults, with the showcase"]
    for name, fields in configs.items():
        lines += render_engine(plain, results[name], fields, prompt_lengths)
    return "\n".join([*lines, "", WHY_CPU_GAINS_NOTHING])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=("gloo", "shm"), default="gloo",
                        help="gloo: vLLM's AVX2 build, forced (all_reduce over gloo); shm: the build vLLM picks here")
    parser.add_argument("--threshold", type=int, default=THRESHOLD)
    parser.add_argument("--prompt-lengths", default=",".join(map(str, engine.PROMPT_LENGTHS)))
    args = parser.parse_args(argv)
    lengths = tuple(int(n) for n in args.prompt_lengths.split(","))
    configs = {"defaults": {}, "showcase": fcpass_fields(args.threshold)}
    env = kernels.avx2_env() if args.kernels == "gloo" else None
    with tempfile.TemporaryDirectory(prefix="fcpass-tiny-llama-") as model_dir:
        engines = {"plain": (None, env), **{name: (fields, env) for name, fields in configs.items()}}
        print(render(engine.run_all(model_dir, engines, lengths), configs, lengths))


if __name__ == "__main__":
    main()
