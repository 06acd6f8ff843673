"""fcpass's compile-time cost: FlashCommPass vs vLLM 0.31 AsyncTPPass on one graph; cold compile with/without it.

    python -m benchmarks.pass_cost [--quick] [--layers 32] [--repeats 7] [--compile-layers N] [--compile-repeats 3]
                                   [--compile-variants plain,fcpass_sp+fusion,vllm_sp,vllm_sp+fcpass_fusion]
                                   [--skip-compile]

1. Pass time. vLLM's own Llama (devtools.vllm_cpu, hidden 256, fp32) with
   ``--layers`` decoder layers at TP=2 on 2 gloo ranks is compiled up to the
   post-grad passes. There the plain TP graph is captured, its SP form derived
   once with vLLM's SequenceParallelismPass, and each variant
   (benchmarks/pass_timer.py VARIANTS) runs on a fresh deep copy of its source
   graph, variants interleaved, ``--repeats`` times; medians reported. Every
   variant's fused-op counts are checked against 2 mm->reduce_scatter and
   2 all_gather->mm sites per layer, so both passes are timed doing the same work.
   Goal (benchmark issue): FlashCommPass fusion <= 0.5x AsyncTPPass on the SP graph.
2. Compile time. Each ``--compile-variants`` entry (benchmarks/compile_time.py;
   default: the plain TP graph without, and with fcpass's SP + fusion) is
   compiled cold ``--compile-repeats`` times, every time in fresh rank
   processes with an empty Inductor cache dir, variants interleaved: Dynamo's
   frame compile time (tracing + AOT + Inductor + codegen, all post-grad passes
   included) of the first call, slowest rank. Also reported: the harness's
   whole post-grad custom pass (SP/fcpass plus vLLM's tail passes) and the
   C++ compiler's time summed over Inductor's parallel compile workers (it
   can exceed the wall time; it dominates a cold CPU compile).

Writes benchmarks/results/pass_cost.json (--quick: pass_cost_quick.json), prints tables; progress on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
from devtools.launch import run_ranks
from benchmarks import cli
from benchmarks.compile_time import BASELINES, COMPILE_VARIANTS, PART_METRICS, compile_once
from benchmarks.pass_timer import VARIANTS, require_vllm_sp_passes, time_passes

logger = logging.getLogger("pass_cost")

WORLD_SIZE = 2
CAPTURE_TOKENS = 64  # the capture compile never runs the graph; any count gives the same symbolic graph
COMPILE_TOKENS = 64
# fcpass's own job (vLLM 0.32+ has no SP): ~25 min at 32 layers and 3 repeats
DEFAULT_COMPILE_VARIANTS = ("plain", "fcpass_sp+fusion")
QUICK = {"layers": 2, "repeats": 3, "compile_repeats": 1}
GOAL_RATIO = 0.5
# (fcpass variant, the vLLM variant doing the same job on the same graph)
COMPARISONS = (("fcpass_fusion", "vllm_async_tp"), ("fcpass_sp", "vllm_sp"), ("fcpass_sp+fusion", "vllm_sp+async_tp"))
FUSING_VARIANTS = ("vllm_async_tp", "fcpass_fusion", "vllm_sp+async_tp", "fcpass_sp+fusion")
# Wall time on this 2-core machine, fitted to 2- and 8-layer runs (for the deadlines and the estimate).
PASS_PHASE_S = (50, 6)  # fixed (spawn, capture), and per layer times (1 + repeats / 4)
COMPILE_RUN_S = (40, 6)  # per cold compile run: fixed (spawn, imports, model), and per layer


def _rank_setup():
    """Each rank: vLLM custom-op collectives on (the harness's setup); benchmark progress at INFO on stderr."""
    from devtools.vllm_cpu import rank_setup

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("pass_timer").setLevel(logging.INFO)
    rank_setup()


def _compile_variants(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(COMPILE_VARIANTS))
    if unknown or not names:
        problem = f"unknown compile variant(s) {unknown}" if unknown else f"no compile variant in {text!r}"
        raise argparse.ArgumentTypeError(f"{problem}; known: {', '.join(COMPILE_VARIANTS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['layers']} layers, {QUICK['repeats']} repeats, "
                             f"{QUICK['compile_repeats']} compile per variant (explicit options still win)")
    parser.add_argument("--layers", type=int, help="decoder layers of the timed graph (default 32)")
    parser.add_argument("--repeats", type=int, help="timed runs per pass variant (default 7)")
    parser.add_argument("--compile-layers", type=int, help="decoder layers for compile time (default: --layers)")
    parser.add_argument("--compile-repeats", type=int, help="cold compiles per variant (default 3)")
    parser.add_argument("--compile-variants", type=_compile_variants, default=DEFAULT_COMPILE_VARIANTS,
                        help=f"comma-separated, of {', '.join(COMPILE_VARIANTS)} "
                             f"(default: {','.join(DEFAULT_COMPILE_VARIANTS)})")
    parser.add_argument("--skip-compile", action="store_true", help="pass times only")
    parser.add_argument("--out", help="result JSON (default results/pass_cost.json; with --quick "
                                      "results/pass_cost_quick.json, so a smoke run keeps the real results)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"layers": 32, "repeats": 7, "compile_repeats": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.compile_layers is None:
        args.compile_layers = args.layers
    if args.out is None:
        args.out = os.path.join(cli.RESULTS_DIR, "pass_cost_quick.json" if args.quick else "pass_cost.json")
    for name in ("layers", "repeats", "compile_layers", "compile_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _pass_phase_s(layers: int, repeats: int) -> float:
    fixed, per_layer = PASS_PHASE_S
    return fixed + per_layer * layers * (1 + repeats / 4)


def _compile_run_s(layers: int) -> float:
    fixed, per_layer = COMPILE_RUN_S
    return fixed + per_layer * layers


def estimate_s(args) -> float:
    """Rough wall time of the whole run on this machine (idle; another job's load stretches it)."""
    total = _pass_phase_s(args.layers, args.repeats)
    if not args.skip_compile:
        total += len(args.compile_variants) * args.compile_repeats * _compile_run_s(args.compile_layers)
    return total


# --------------------------------------------------------------------------- pass time

def measure_passes(args) -> dict:
    deadline = 2 * _pass_phase_s(args.layers, args.repeats) + 300
    logger.info("pass time: %d layers, %d repeats of %d variants (deadline %.0f s)", args.layers, args.repeats,
                len(VARIANTS), deadline)
    start = time.perf_counter()
    per_rank = run_ranks(time_passes, WORLD_SIZE, args.layers, args.repeats, CAPTURE_TOKENS, setup=_rank_setup,
                         timeout=deadline)
    logger.info("pass time done in %.0f s", time.perf_counter() - start)
    expected = 2 * args.layers
    checks = {}
    for name in VARIANTS:
        afters = [r["variants"][name]["after"] for r in per_rank]
        if name in FUSING_VARIANTS:
            ok = all(a.get("fused_mm_rs") == expected and a.get("fused_ag_mm") == expected for a in afters)
        else:  # SP only: every all_reduce split (2 per layer + the embedding's)
            ok = all(a.get("all_reduce", 0) == 0 and a.get("reduce_scatter") == expected + 1 for a in afters)
        checks[name] = ok
    ratios = {}
    for ours, theirs in COMPARISONS:
        by_rank = [r["variants"][ours]["median_ms"] / r["variants"][theirs]["median_ms"] for r in per_rank]
        ratios[f"{ours} / {theirs}"] = {"median_by_rank": by_rank,
                                        "min": _fastest(per_rank, ours) / _fastest(per_rank, theirs)}
    return {"layers": args.layers, "repeats": args.repeats, "capture_tokens": CAPTURE_TOKENS,
            "expected_sites_per_family": expected, "rewrote_expected": checks, "ratios": ratios,
            "goal": f"fcpass_fusion / vllm_async_tp <= {GOAL_RATIO}", "per_rank": per_rank}


def _fastest(per_rank: list[dict], variant: str) -> float:
    """The fastest run of ``variant`` on any rank: the least disturbed by the other load on the machine."""
    return min(min(r["variants"][variant]["times_ms"]) for r in per_rank)


def print_passes(result: dict) -> None:
    per_rank = result["per_rank"]
    print(f"\nPass time on one captured graph: vLLM Llama, {result['layers']} layers, TP=2, "
          f"median of {result['repeats']} (ms, rank 0 / rank 1)")
    for source, summary in per_rank[0]["source"].items():
        print(f"  source graph {source!r}: {summary}")
    print(f"{'variant':<18} {'graph':<6} {'rank 0':>9} {'rank 1':>9} {'fastest':>9} {'mm->RS':>7} {'AG->mm':>7} "
          f"{'RS':>4} {'AG':>4} {'AR':>4}  as expected")
    for name, (source, _) in VARIANTS.items():
        v0, v1 = (r["variants"][name] for r in per_rank)
        a = v0["after"]
        print(f"{name:<18} {source:<6} {v0['median_ms']:>9.1f} {v1['median_ms']:>9.1f} "
              f"{_fastest(per_rank, name):>9.1f} {a.get('fused_mm_rs', 0):>7} "
              f"{a.get('fused_ag_mm', 0):>7} {a.get('reduce_scatter', 0):>4} {a.get('all_gather', 0):>4} "
              f"{a.get('all_reduce', 0):>4}  {'yes' if result['rewrote_expected'][name] else 'NO'}")
    print("pass construction (ms, rank 0): " + ", ".join(
        f"{name} {ms:.1f}" for name, ms in per_rank[0]["construct_ms"].items()))
    print("time ratios (median rank 0 / median rank 1 / fastest):")
    for label, ratio in result["ratios"].items():
        print(f"  {label}: " + " / ".join(f"{x:.2f}x" for x in (*ratio["median_by_rank"], ratio["min"])))
    goal = result["ratios"][f"{COMPARISONS[0][0]} / {COMPARISONS[0][1]}"]
    met = max(goal["median_by_rank"]) <= GOAL_RATIO
    print(f"goal {result['goal']} (median, every rank): {'met' if met else 'NOT met'}")


# --------------------------------------------------------------------------- compile time

def measure_compiles(args) -> dict:
    variants = args.compile_variants
    deadline = 3 * _compile_run_s(args.compile_layers) + 300
    runs = {name: [] for name in variants}
    total = len(variants) * args.compile_repeats
    for repeat in range(args.compile_repeats):
        shift = repeat % len(variants)
        for name in variants[shift:] + variants[:shift]:  # interleaved, order rotated
            start = time.perf_counter()
            ranks = run_ranks(compile_once, WORLD_SIZE, name, args.compile_layers, COMPILE_TOKENS,
                              setup=_rank_setup, timeout=deadline)
            runs[name].append(ranks)
            done = sum(len(r) for r in runs.values())
            logger.info("[%d/%d] compile %s: %.1f s (rank 0 %.1f s, rank 1 %.1f s), run took %.0f s", done, total,
                        name, max(r["compile_s"] for r in ranks), ranks[0]["compile_s"], ranks[1]["compile_s"],
                        time.perf_counter() - start)
    summary = {}
    for name, repeats in runs.items():
        slowest = [max(ranks, key=lambda r: r["compile_s"]) for ranks in repeats]
        summary[name] = {
            "compile_s_median": statistics.median(r["compile_s"] for r in slowest),
            "compile_s_slowest_rank": [r["compile_s"] for r in slowest],
            **{f"{part}_median": statistics.median(r[part] for r in slowest) for part in PART_METRICS},
            "max_rel_error": max(r["max_rel_error"] for ranks in repeats for r in ranks),
            "matched_rank0": repeats[0][0]["matched"], "compilations": repeats[0][0]["compilations"],
        }
    return {"layers": args.compile_layers, "repeats": args.compile_repeats, "tokens": COMPILE_TOKENS,
            "metric": "Dynamo _compile.compile_inner of the first call, slowest rank, fresh processes and "
                      "Inductor cache dir", "variants": summary, "runs": runs}


def print_compiles(result: dict) -> None:
    print(f"\nCold torch.compile time, vLLM Llama {result['layers']} layers, TP=2, first call at "
          f"{result['tokens']} tokens (s; median of {result['repeats']}, slowest rank)")
    variants = result["variants"]
    print(f"{'variant':<22} {'compile s':>10} {'custom pass s':>14} {'C++ sum s':>9} {'vs baseline':>24} "
          f"{'max rel err':>12}  rewritten sites (rank 0)")
    for name, v in variants.items():
        base = BASELINES.get(name)
        rel = f"{v['compile_s_median'] / variants[base]['compile_s_median']:.2f}x {base}" if base in variants else "-"
        fused = {family: sum(forms.values()) for family, forms in v["matched_rank0"].items()}
        print(f"{name:<22} {v['compile_s_median']:>10.1f} {v['custom_post_pass_s_median']:>14.2f} "
              f"{v['cpp_compile_s_median']:>9.1f} {rel:>24} {v['max_rel_error']:>12.1e}  {fused or '-'}")


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    require_vllm_sp_passes()
    cli.setup_logging()
    logger.info("estimated duration on an idle machine: %.0f min", estimate_s(args) / 60)
    result = {**cli.machine(), "world_size": WORLD_SIZE, "dtype": "float32",
              "model": "vLLM LlamaModel (devtools.vllm_cpu 'llama'), hidden 256, intermediate 512"}
    start = time.perf_counter()
    result["pass_time"] = measure_passes(args)
    print_passes(result["pass_time"])
    if not args.skip_compile:
        result["compile_time"] = measure_compiles(args)
        print_compiles(result["compile_time"])
    result["duration_s"] = time.perf_counter() - start
    cli.write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['duration_s']:.0f} s)")
    if not all(result["pass_time"]["rewrote_expected"].values()):
        logger.error("some variant did not rewrite the expected sites; the comparison is not like for like")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
