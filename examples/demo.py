"""Demo: vLLM's real engine, ``vllm.LLM(tensor_parallel_size=2)`` on CPU, with and without fcpass.

    python -m examples.demo [--config defaults|showcase] [--kernels gloo|shm] [--threshold 16]
                            [--prompt-lengths 5,40,100]

A tiny random Llama checkpoint (2 layers, hidden 256, fp32) is written at
startup (no download); two engines run it side by side, one without fcpass,
one with ``fcpass.vllm.compilation_config(PassConfig(...))`` as a user turns
it on (see devtools/engine.py for what the CPU engine needs and compiles). It prints each worker's why-not-fused report, the
fused/unfused decisions per prefill size, the greedy tokens of both engines
and whether they are equal, and each engine's times.

By default the engines run vLLM's AVX2 kernel build (forced, on any x86 CPU),
whose all_reduce goes over gloo: there the split and the fusion apply.
``--kernels shm`` runs the build vLLM picks on this CPU; on AVX-512 machines
its all_reduce is vLLM's shared-memory kernel, faster than the split's
collectives, and fcpass leaves it alone (the report says so).

``--config defaults`` (the default) runs ``PassConfig()``, the config to
deploy: it does no harm (benchmarks/README.md, "engine.py"): nothing is
split, matmul -> all_reduce takes the row-parallel sites and its guard keeps
them on the plain path on CPU, where the pipeline cannot gain.
``--config showcase`` shows the rewrite at every size (sequence parallelism
from 1 token, fusion above ``--threshold``; the CPU engine compiles one graph
for all token counts, so the split runs at decode sizes too): measured
slower, a demonstration only.
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
        return "PassConfig() (the defaults, the config to deploy: no harm, see benchmarks/README.md)"
    return f"PassConfig({fields}) (the showcase: it splits at every size; deploy PassConfig())"


FROM_CACHE = ("no report: the compiled graph came from the compile cache, so the pass did not run in this "
              "process;\nits fused ops carry the config they were compiled with")


def render(results: dict, fields: dict, prompt_lengths) -> str:
    plain, fused = results["plain"], results["fcpass"]
    reports = [PassReport.from_rows(worker[-1]) for worker in fused["reports"] if worker]
    lines = [f"vLLM engine, tiny random Llama ({engine.LAYERS} layers, hidden {engine.HIDDEN}, fp32), "
             f"tensor_parallel_size=2 on CPU, all_reduce kernel {fused['all_reduce'][0]};\n"
             f"fcpass: {describe(fields)}"]
    if reports:
        same = all(r.table() == reports[0].table() for r in reports)
        others = "the other the same" if same else "the other differs"
        lines += [f"\nWhy-not-fused report ({len(reports)} of {len(fused['reports'])} workers ran the pass; "
                  f"{others if len(reports) > 1 else 'the other was served from the cache'}):",
                  reports[0].table()]
    else:
        lines += ["\nWhy-not-fused report: " + FROM_CACHE]
    lines += ["", f"{'prefill tokens':>14}  decisions per worker (fused ops' guard)"]
    for n, per_worker in zip(prompt_lengths, fused["decisions"]):
        agree = all(d == per_worker[0] for d in per_worker)
        calls = ", ".join(f"{key} x{count}" for key, count in sorted(per_worker[0].items())) or "no fused op in the graph"
        lines.append(f"{n:>14}  {calls}" + ("" if agree else "  (workers disagree!)"))
    lines.append("\ngreedy tokens (without fcpass | with fcpass):")
    for n, a, b in zip(prompt_lengths, plain["ids"], fused["ids"]):
        lines.append(f"{n:>14}  {a} | {b}  {'equal' if a == b else 'DIFFERENT'}")
    lines.append(f"\nall greedy tokens equal: {'yes' if plain['ids'] == fused['ids'] else 'NO'}")
    lines.append(f"engine start s (without / with): {plain['start_s']:.1f} / {fused['start_s']:.1f}; "
                 f"generate s: {plain['generate_s']:.2f} / {fused['generate_s']:.2f} "
                 "(2 shared cores: timings are not a benchmark)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("defaults", "showcase"), default="defaults",
                        help="defaults: PassConfig(); showcase: sequence parallelism at every size")
    parser.add_argument("--kernels", choices=("gloo", "shm"), default="gloo",
                        help="gloo: vLLM's AVX2 build, forced (all_reduce over gloo); shm: the build vLLM picks here")
    parser.add_argument("--threshold", type=int, default=THRESHOLD)
    parser.add_argument("--prompt-lengths", default=",".join(map(str, engine.PROMPT_LENGTHS)))
    args = parser.parse_args(argv)
    lengths = tuple(int(n) for n in args.prompt_lengths.split(","))
    fields = fcpass_fields(args.threshold) if args.config == "showcase" else {}
    with tempfile.TemporaryDirectory(prefix="fcpass-tiny-llama-") as model_dir:
        engine.write_tiny_llama(model_dir)
        env = kernels.avx2_env() if args.kernels == "gloo" else None
        print(render(engine.run_both(model_dir, fields, lengths, env=env), fields, lengths))


if __name__ == "__main__":
    main()
