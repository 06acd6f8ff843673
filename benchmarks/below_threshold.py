"""Below the threshold fcpass costs nothing: the real engine with a fused op at every all_reduce site, every call
below its threshold, against the engine without fcpass, in alternating rounds.

    python -m benchmarks.below_threshold [--rounds 4] [--engine shm] [--quick] [--out PATH]

On vLLM's CPU engine (``shm``: the kernel library vLLM picks here, its shared-memory all_reduce; ``gloo``: its
AVX2 build), TP=2, a random fp32 Llama (hidden 512, 4 layers): ``off`` (no fcpass) and ``below``
(``threshold_tokens`` at its maximum and ``keep_faster_transports`` off, so the pass puts ``fcpass.mm_all_reduce*``
at every all_reduce site, vLLM's shm ones included, and every call takes the unfused path: the site's own matmul and all_reduce, behind the guard and the op's
dispatch). One engine process at a time, the two configs alternating round by round (off first in even rounds,
below first in odd ones), prefill 256-4096 tokens and decode batch 1/8/32 as benchmarks/engine.py times them.
Per point: each config's median over the rounds, below / off, and the noise of this machine on that point
(the spread of off's own rounds, max / min - 1): "within noise" where |below / off - 1| <= that spread.
The below engine's reports and decisions are checked: every all_reduce fused into the op, every call unfused.

Writes benchmarks/results/below_threshold.json (--quick: below_threshold_quick.json) and a table on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks import cli, engine as engine_bench
from devtools import engine
from fcpass.limits import MAX_THRESHOLD_TOKENS

CONFIGS = {"off": None, "below": {"threshold_tokens": MAX_THRESHOLD_TOKENS, "keep_faster_transports": False}}
FULL = {**engine_bench.FULL, "prefill_tokens": (256, 1024, 4096), "decode_batches": (1, 8, 32), "repeats": 5,
        "decode_repeats": 3}
QUICK = {**engine_bench.QUICK, "decode_batches": (1, 8), "repeats": 3, "decode_repeats": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of off and below (default 4)")
    parser.add_argument("--engine", choices=engine_bench.ENGINE_KINDS, default="shm")
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, prefill 256/1024, decode 1/8")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the noise is the spread of off's rounds)")
    args.settings = dict(QUICK if args.quick else FULL)
    args.out = args.out or os.path.join(cli.RESULTS_DIR, "below_threshold_quick.json" if args.quick
                                        else "below_threshold.json")
    return args


def checked(config: str, run: dict) -> dict:
    """What the below engine's workers did: sites fused per family, and the paths its calls took."""
    rows = [row for worker in run["reports"] for graph in worker for row in graph]
    paths = sorted({key for call in run["calls"] for worker in call["decisions"] for key in worker})
    return {"config": config, "report_rows": rows, "decisions": paths}


def summarise(points: list[dict]) -> list[dict]:
    """Per point: each config's median over the rounds, below / off, off's spread (its noise here)."""
    by_key: dict[tuple, dict[str, list[float]]] = {}
    for p in points:
        by_key.setdefault(engine_bench.point_key(p), {}).setdefault(p["config"], []).append(p["value"])
    rows = []
    for key, values in by_key.items():
        off, below = values.get("off", []), values.get("below", [])
        if not off or not below:
            continue
        ratio = statistics.median(below) / statistics.median(off)
        noise = max(off) / min(off) - 1
        rows.append({"engine": key[0], "metric": key[1], "tokens": key[2], "batch": key[3],
                     "off_ms": off, "below_ms": below, "off_median_ms": statistics.median(off),
                     "below_median_ms": statistics.median(below), "below_over_off": ratio, "off_spread": noise,
                     "within_noise": abs(ratio - 1) <= noise})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    settings, plan_ = args.settings, engine_bench.plan(args.settings)
    result = {**cli.machine(), "vllm": engine_bench._vllm_version(), "engine": args.engine, "rounds": args.rounds,
              "configs": CONFIGS, "settings": settings, "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": f"random Llama, hidden {settings['hidden']}, {settings['layers']} layers, fp32"}
    work = tempfile.mkdtemp(prefix="fcpass-below-bench-")
    points, checks, failures = [], [], []
    start = time.perf_counter()
    try:
        model_dir = engine.write_llama(os.path.join(work, "llama"), settings["hidden"], settings["layers"],
                                       max_positions=plan_["engine_args"]["max_model_len"] + 64)
        env = engine_bench.kind_env(args.engine, work)
        for round_ in range(args.rounds):
            order = ("off", "below") if round_ % 2 == 0 else ("below", "off")
            for config in order:
                label = f"{args.engine}/{config}/round {round_ + 1}"
                try:
                    run = engine_bench.run_llm(label, model_dir, CONFIGS[config], plan_, env)
                except (RuntimeError, TimeoutError, OSError) as error:
                    failures.append({"config": config, "round": round_, "error": str(error)[-4000:]})
                    continue
                points += [{**p, "round": round_} for p in engine_bench.llm_points(args.engine, config, run)]
                checks.append({**checked(config, run), "round": round_, "all_reduce": run["all_reduce"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarise(points)
    result.update({"points": points, "checks": checks, "failures": failures, "summary": rows,
                   "duration_s": time.perf_counter() - start})
    cli.write_json(args.out, result)
    print("| point | off ms (median) | below ms (median) | below / off | off's spread | within noise |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        label = engine_bench.point_label({**row, "value": None})
        print(f"| {label} | {row['off_median_ms']:.1f} | {row['below_median_ms']:.1f} | {row['below_over_off']:.3f} "
              f"| {100 * row['off_spread']:.1f} % | {'yes' if row['within_noise'] else 'no'} |")
    print(f"\nwrote {args.out} in {result['duration_s']:.0f} s")
    for failure in failures:
        print(f"FAILED {failure['config']} round {failure['round'] + 1}:\n{failure['error'][-2000:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
