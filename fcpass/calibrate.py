"""Measure the fusion crossover per shape, write the threshold table, and check the guarded op against it.

On your machine, on the backend and group you serve with: one process per device, as torchrun starts them
(NPUs over HCCL, GPUs over NCCL, CPUs over gloo), the table for ``PassConfig(threshold_table=...)``:

    torchrun --nproc-per-node 8 -m fcpass.calibrate --launched --device npu --dtype bfloat16 \\
        --shapes 4096x4096,1024x8192 --out thresholds.json [--report calibration.json] [--quick]

On this CPU, on local gloo ranks it starts itself:

    python -m fcpass.calibrate --world-size 2 --shapes 1024x1024,512x2048 \\
        --tokens 256,512,1024,2048,4096,8192,16384 --dtype float32 --out thresholds.json

The table is the backend's the device's tensors run on (``PassConfig(backend="auto")``: npu, cuda, generic),
for that world size and dtype; it is read where the config is built (``vllm serve``'s API server), so it
lives on that machine's disk. Both phases run every op family:

1. Measure: per (op, shape, tokens), unfused vs fused at each candidate
   chunk count, interleaved. Per shape, the crossover is the smallest
   measured token count from which the best fused stays ahead of unfused;
   its entry's threshold_tokens is the largest measured count below the
   crossover (fuse when tokens > threshold; crossover - 1 when nothing
   below it was measured). No crossover: threshold MAX_THRESHOLD_TOKENS,
   above every measured count (never fuse), said in the entry and the log.
   pipeline_chunks: the candidate with the smallest mean time relative to
   the best candidate, over the points from the crossover on.
2. Check: the table loaded through PassConfig(threshold_table=...), the
   guarded op (threshold -1: resolved from the table) measured at every
   point against the two paths it chooses between, in the same run: the
   unfused op and the fused op at the table's chunk count. Per point: ratio
   = guarded / min(unfused, fused), and path_ratio, the same with the
   guarded op's samples pooled with those of the path it ran (see
   check_rank); their maxima against the goal (<= 1.05) into the report.

Each shape is one bucket (floor(log2 k), floor(log2 n)) of the table, so two
shapes in one bucket are refused. Durations on a 2-core CPU machine when idle:
--quick (512 and 4096 tokens) ~2-3 min; the default 256..16384 tokens ~14 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fcpass
from fcpass import cli, measure, thresholds
from fcpass.backends import select_backend
from fcpass.limits import MAX_THRESHOLD_TOKENS, WORLD_SIZE_RANGE
from fcpass.local_ranks import run_ranks

logger = logging.getLogger(__name__)

DEFAULT_SHAPES = "1024x1024,512x2048"
DEFAULT_TOKENS = ",".join(str(2**p) for p in range(8, 15))  # 256 .. 16384
QUICK_TOKENS = "512,4096"
GOAL_RATIO = 1.05
# One sample varies by ~15 % on an idle machine (the same path measured as three variants, 9 repeats each,
# gave medians 21 % apart), and both phases compare paths a few % apart: more repeats than ops.py's.
REPEATS = 15
# The process group's backend for the device's tensors.
GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def table_backend(device: str) -> str:
    """The backend the fused variants run on for ``device``'s tensors (backend "auto"): the table is that one's."""
    return select_backend("auto", torch.device(device)).name


def plan(shapes, tokens) -> list[tuple[str, int, int, int]]:
    return [(op, k, n, t) for op in measure.OPS for k, n in shapes for t in tokens]


@measure.rank_main
def measure_rank(rank: int, world_size: int, points, dtype, device: str = "cpu") -> list[dict]:
    """Phase 1: unfused and every fused candidate per point."""
    results = []
    for op, k, n, tokens in points:
        point = measure.Point(op, tokens, k, n, world_size, dtype, device=device)
        ms = measure.medians({"unfused": point.unfused(), **point.fused_variants()}, REPEATS, device=device)
        best_chunks, best, fused = measure.best_fused(ms)
        results.append({"op": op, "k": k, "n": n, "tokens": tokens, "unfused_ms": ms["unfused"], "fused_ms": fused,
                        "best_chunks": best_chunks, "best_fused_ms": best, "speedup": ms["unfused"] / best})
        logger.info("measure [%d/%d] %s k=%d n=%d tokens=%d: fused %.2fx (%d chunks)", len(results), len(points),
                    op, k, n, tokens, ms["unfused"] / best, best_chunks)
    return results


@measure.rank_main
def check_rank(rank: int, world_size: int, points, dtype, table_path: str, device: str = "cpu") -> list[dict]:
    """Phase 2: the guarded op under the table, against the two paths it chooses between.

    Those are the unfused op and the fused op as the table configures it (its chunk count), all three
    interleaved, REPEATS times. ``ratio`` = guarded / min(unfused, fused), medians. ``path_ratio``:
    the guarded op runs exactly one of the two paths (plus a decision of microseconds), so its samples
    and that path's are one population; path_ratio = that pool's median / min(it, the other path's
    median): 1.0 where the guard chose the faster path, else how much slower its choice is.
    """
    config = fcpass.PassConfig(threshold_table=table_path)
    results = []
    for op, k, n, tokens in points:
        point = measure.Point(op, tokens, k, n, world_size, dtype, device=device)
        guarded = point.configured(config, measure.CONFIG_THRESHOLD)
        fcpass.reset_decision_counts()
        guarded()
        ((_, path, _),) = fcpass.decision_counts()
        samples = measure.sample({"guarded": guarded, "unfused": point.unfused(),
                                  "fused": point.configured(config, measure.ALWAYS_FUSE)}, REPEATS, device=device)
        ms = {name: statistics.median(values) for name, values in samples.items()}
        other = "fused" if path == "unfused" else "unfused"
        chosen = statistics.median(samples["guarded"] + samples[path])
        best = min(ms["unfused"], ms["fused"])
        results.append({"op": op, "k": k, "n": n, "tokens": tokens, "guarded_path": path,
                        "guarded_ms": ms["guarded"], "unfused_ms": ms["unfused"], "fused_ms": ms["fused"],
                        "best_ms": best, "ratio": ms["guarded"] / best,
                        "path_ratio": chosen / min(chosen, ms[other])})
        logger.info("check [%d/%d] %s k=%d n=%d tokens=%d: guarded (%s) / best = %.3f, path ratio %.3f",
                    len(results), len(points), op, k, n, tokens, path, results[-1]["ratio"],
                    results[-1]["path_ratio"])
    return results


def derive_entry(series: list[dict], world_size: int, dtype: torch.dtype) -> dict:
    """One table entry from one (op, shape)'s measured points."""
    series = sorted(series, key=lambda p: p["tokens"])
    op, k, n = series[0]["op"], series[0]["k"], series[0]["n"]
    tokens = [p["tokens"] for p in series]
    cross = measure.crossover([(p["tokens"], p["speedup"]) for p in series])
    measured = {"k": k, "n": n, "crossover_tokens": cross,
                "speedup_by_tokens": {str(p["tokens"]): round(p["speedup"], 3) for p in series}}
    if cross is None:
        measured["note"] = f"no crossover up to {tokens[-1]} tokens: never fuse"
        logger.warning("%s k=%d n=%d: fused never stayed ahead up to %d tokens; threshold %d (never fuse)",
                       op, k, n, tokens[-1], MAX_THRESHOLD_TOKENS)
        return thresholds.entry_dict(op, world_size, dtype, k, n, MAX_THRESHOLD_TOKENS, measured=measured)
    below = [t for t in tokens if t < cross]
    threshold = below[-1] if below else cross - 1
    ahead = [p for p in series if p["tokens"] >= cross]
    chunks = min(measure.CHUNK_CANDIDATES, key=lambda c: statistics.mean(
        p["fused_ms"][str(c)] / p["best_fused_ms"] for p in ahead))
    return thresholds.entry_dict(op, world_size, dtype, k, n, threshold, pipeline_chunks=chunks, measured=measured)


def build_table(points: list[dict], shapes, world_size: int, dtype: torch.dtype, argv, device: str = "cpu") -> dict:
    entries = [derive_entry([p for p in points if (p["op"], p["k"], p["n"]) == (op, k, n)], world_size, dtype)
               for op in measure.OPS for k, n in shapes]
    provenance = {**cli.machine(GROUP_BACKENDS[device]), "command": "python -m fcpass.calibrate " + " ".join(argv),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "candidates": list(measure.CHUNK_CANDIDATES)}
    return thresholds.table_dict(table_backend(device), entries, measured=provenance)


def _summary(entry: dict) -> dict:
    return {"op": entry["op"], "threshold_tokens": entry["threshold_tokens"],
            "pipeline_chunks": entry.get("pipeline_chunks"), **entry["measured"]}


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found.add_argument("--launched", action="store_true",
                       help="run as one rank of a group a launcher started (torchrun: RANK, WORLD_SIZE, LOCAL_RANK, "
                            "MASTER_ADDR, MASTER_PORT); without it: --world-size local gloo ranks on this CPU")
    found.add_argument("--device", choices=sorted(GROUP_BACKENDS), default="cpu",
                       help="the tensors' device (--launched): npu (hccl), cuda (nccl), cpu (gloo)")
    found.add_argument("--world-size", type=int, default=2, help="local gloo ranks to start (without --launched)")
    found.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN (one table bucket each)")
    found.add_argument("--tokens", help=f"comma-separated token counts (default {DEFAULT_TOKENS})")
    found.add_argument("--dtype", default="float32", help=f"one of {sorted(cli.DTYPES)}")
    found.add_argument("--out", default="thresholds.json", help="the table")
    found.add_argument("--report", default="calibration.json", help="every measurement, and the check's ratios")
    found.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS} unless --tokens (~2-3 min idle)")
    return found


def parse_args(argv):
    """The arguments, checked against each other and the launcher's environment."""
    cli_parser = parser()
    args = cli_parser.parse_args(argv)
    if args.launched:
        args.world_size = int(os.environ.get("WORLD_SIZE", "0"))
        if not args.world_size or "RANK" not in os.environ:
            cli_parser.error("--launched: RANK and WORLD_SIZE are not set (start it with torchrun)")
    elif args.device != "cpu":
        cli_parser.error(f"--device {args.device}: run it with --launched, one process per device (torchrun)")
    lo, hi = WORLD_SIZE_RANGE
    if not lo <= args.world_size <= hi:
        cli_parser.error(f"world size {args.world_size} must be in [{lo}, {hi}]")
    try:
        args.shapes = cli.shape_list(args.shapes)
        args.tokens = cli.int_list(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS), "--tokens",
                                   multiple_of=args.world_size)
        args.dtype = cli.dtype_arg(args.dtype)
    except argparse.ArgumentTypeError as exc:
        cli_parser.error(str(exc))
    buckets = {}
    for k, n in args.shapes:
        other = buckets.setdefault((thresholds.bucket(k), thresholds.bucket(n)), (k, n))
        if other != (k, n):
            cli_parser.error(f"--shapes: {other[0]}x{other[1]} and {k}x{n} share one table bucket "
                             f"(floor(log2) of k and of n); measure one of them")
    return args


def _phases_here(args, todo):
    """Both phases in this process, one rank of the launcher's group on its device: (measured, checked); rank 0
    writes the table between them (one machine: every rank reads it from the same disk)."""
    if args.device != "cpu":
        getattr(torch, args.device).set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(GROUP_BACKENDS[args.device])
    rank = dist.get_rank()
    try:
        measured = measure_rank(rank, args.world_size, todo, args.dtype, args.device)
        if rank == 0:
            _write_table(args, measured)
        dist.barrier()
        return measured, check_rank(rank, args.world_size, todo, args.dtype, os.path.abspath(args.out), args.device)
    finally:
        dist.destroy_process_group()


def _phases_on_local_ranks(args, todo):
    measured = run_ranks(measure_rank, args.world_size, todo, args.dtype, timeout=4 * 3600)[0]
    _write_table(args, measured)
    checked = run_ranks(check_rank, args.world_size, todo, args.dtype, os.path.abspath(args.out),
                        timeout=4 * 3600)[0]
    return measured, checked


def _write_table(args, measured) -> None:
    cli.write_json(args.out, build_table(measured, args.shapes, args.world_size, args.dtype, args.argv, args.device))
    logger.info("wrote %s", args.out)
    fcpass.PassConfig(threshold_table=args.out)  # fails here, clearly, if the table we wrote does not load


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    cli.setup_logging()
    todo = plan(args.shapes, args.tokens)
    logger.info("measuring %d points, then the guarded op under the table, on %d %s ranks", len(todo),
                args.world_size, GROUP_BACKENDS[args.device])
    measured, checked = (_phases_here if args.launched else _phases_on_local_ranks)(args, todo)
    if args.launched and int(os.environ["RANK"]):
        return  # rank 0 reports
    with open(args.out) as f:
        table = json.load(f)
    worst = max(checked, key=lambda p: p["ratio"])
    worst_path = max(checked, key=lambda p: p["path_ratio"])
    report = {
        **cli.machine(GROUP_BACKENDS[args.device]), "world_size": args.world_size,
        "dtype": thresholds.dtype_name(args.dtype), "device": args.device,
        "table": args.out, "repeats": REPEATS, "goal_max_ratio": GOAL_RATIO,
        "max_ratio": worst["ratio"], "goal_met": worst["ratio"] <= GOAL_RATIO,
        "max_path_ratio": worst_path["path_ratio"], "path_goal_met": worst_path["path_ratio"] <= GOAL_RATIO,
        "thresholds": [_summary(e) for e in table["entries"]],
        "measure": measured, "check": checked,
    }
    cli.write_json(args.report, report)
    _print(table, checked, worst, worst_path)
    print(f"wrote {args.out} and {args.report}")


def _print(table, checked, worst, worst_path) -> None:
    print(f"\n{'op':<18} {'k':>5} {'n':>5} {'threshold':>9} {'chunks':>6}  crossover")
    for e in table["entries"]:
        m = e["measured"]
        print(f"{e['op']:<18} {m['k']:>5} {m['n']:>5} {e['threshold_tokens']:>9} {e.get('pipeline_chunks', '-'):>6}"
              f"  {m['crossover_tokens'] if m['crossover_tokens'] is not None else 'none (never fuse)'}")
    print(f"\n{'op':<18} {'k':>5} {'n':>5} {'tokens':>6} {'path':>8} {'guarded':>8} {'unfused':>8} {'fused':>8} "
          f"{'ratio':>6} {'path r.':>7}")
    for p in checked:
        print(f"{p['op']:<18} {p['k']:>5} {p['n']:>5} {p['tokens']:>6} {p['guarded_path']:>8} "
              f"{p['guarded_ms']:>8.1f} {p['unfused_ms']:>8.1f} {p['fused_ms']:>8.1f} {p['ratio']:>6.3f} "
              f"{p['path_ratio']:>7.3f}")
    for name, key, p in (("guarded / best", "ratio", worst), ("path ratio", "path_ratio", worst_path)):
        print(f"max {name} = {p[key]:.3f} ({p['op']} k={p['k']} n={p['n']} tokens={p['tokens']}); "
              f"goal <= {GOAL_RATIO}: {'met' if p[key] <= GOAL_RATIO else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
