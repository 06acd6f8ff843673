"""Demo: vLLM's Llama at TP=2 on 2 gloo ranks, compiled with sequence parallelism, with and without fcpass.

    python -m fcpass.demo [--kind llama|llama_bias|llama_3d] [--threshold 256] [--tokens 7,64,256,1024,2048]

The model is vLLM's own ``LlamaModel`` class with random weights (no
download; see fcpass.vllm_cpu_llama for what it takes on CPU). fcpass is
turned on as a vLLM user does, ``fcpass.vllm.compilation_config(PassConfig(...))``
in vLLM's config; vLLM 0.31's SequenceParallelismPass runs first. It prints
the pass's why-not-fused report, the matches per family, and per prefill
size the guard's decisions, the max abs difference from the same model
compiled without fcpass, and the time per prefill both ways.
"""

from __future__ import annotations

import argparse
import collections
import time

from fcpass.launch import run_ranks

TOKENS = (7, 64, 256, 1024, 2048)
THRESHOLD = 256
REPEATS = 3


def demo_rank(rank: int, world_size: int, kind: str, tokens, threshold: int) -> dict:
    import fcpass
    import fcpass.vllm
    from fcpass.vllm_cpu_llama import compile_and_run

    plain = compile_and_run(rank, world_size, kind, tokens, timed_repeats=REPEATS)
    config = fcpass.vllm.compilation_config(fcpass.PassConfig(threshold_tokens=threshold))
    fused = compile_and_run(rank, world_size, kind, tokens, compilation_config=config, timed_repeats=REPEATS)
    report = fused["extra_pass_report"]
    return {
        "report": report.table(), "matched": report.matched(), "padded": fused["padded_counts"],
        "decisions": fused["decisions"], "compilations": (plain["compilations"], fused["compilations"]),
        "max_abs_diff": [(a - b).abs().max().item() for a, b in zip(fused["outputs"], plain["outputs"])],
        "max_rel_error_vs_eager": max(fused["max_rel_error"]),
        "plain_ms": plain["times_ms"], "fused_ms": fused["times_ms"],
    }


def _paths(decisions: dict) -> str:
    """'fused x4' / 'unfused x4' for one family's calls in one prefill."""
    counts = collections.Counter()
    for (_, path, _), n in decisions.items():
        counts[path] += n
    return ", ".join(f"{path} x{n}" for path, n in sorted(counts.items())) or "-"


def _family(decisions: dict, family: str) -> dict:
    return {key: n for key, n in decisions.items() if key[0] == family}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="llama", choices=("llama", "llama_bias", "llama_3d"))
    parser.add_argument("--threshold", type=int, default=THRESHOLD)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]

    from fcpass.vllm_cpu_llama import HIDDEN, LAYERS, rank_setup

    start = time.perf_counter()
    per_rank = run_ranks(demo_rank, 2, args.kind, tokens, args.threshold, setup=rank_setup, timeout=600)
    r0 = per_rank[0]
    print(f"vLLM LlamaModel ({args.kind}: {LAYERS} decoder layers, hidden {HIDDEN}, fp32, random weights), "
          f"TP=2 on 2 gloo ranks, SequenceParallelismPass then FlashCommPass(threshold_tokens={args.threshold})")
    print("\nWhy-not-fused report (rank 0; rank 1 "
          f"{'the same' if per_rank[1]['report'] == r0['report'] else 'differs'}):")
    print(r0["report"])
    print("\nFused sites per family (per rank):",
          "; ".join(f"{family} {sum(forms.values())} = {sum(forms.values()) // LAYERS} per layer x {LAYERS}"
                    for family, forms in sorted(r0["matched"].items())))
    print(f"Compilations per rank (without / with fcpass): {r0['compilations'][0]} / {r0['compilations'][1]}")
    print(f"\n{'tokens':>6} {'padded':>6} {'mm_reduce_scatter':>18} {'all_gather_mm':>14} "
          f"{'max|diff| vs no fcpass':>22} {'no fcpass ms':>12} {'fcpass ms':>9}")
    for i, n in enumerate(tokens):
        decisions = r0["decisions"][i]
        agree = all(r["decisions"][i] == decisions for r in per_rank)
        diff = max(r["max_abs_diff"][i] for r in per_rank)
        print(f"{n:>6} {r0['padded'][i]:>6} {_paths(_family(decisions, 'mm_reduce_scatter')):>18} "
              f"{_paths(_family(decisions, 'all_gather_mm')):>14} {diff:>22.2e} "
              f"{r0['plain_ms'][i]:>12.1f} {r0['fused_ms'][i]:>9.1f}" + ("" if agree else "  (ranks disagree!)"))
    print(f"\nmax relative error vs eager plain TP: {max(r['max_rel_error_vs_eager'] for r in per_rank):.1e}; "
          f"decisions the same on both ranks; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
