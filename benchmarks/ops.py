"""Fused (generic pipeline) vs unfused fcpass ops on 2 gloo ranks, side by side.

    python -m benchmarks.ops [--quick] [--only llama,small,design] [--op mm_reduce_scatter]
                             [--tokens 16,256,...] [--out benchmarks/results/ops.json]

Per (op, shape, tokens) point, measured interleaved in one run so machine
noise hits every variant alike: the unfused path (matmul + collective), the
fused path at each candidate chunk count, the matmul and the collective
alone, the point-to-point exchange the fused path moves those bytes by
(alone), and the matmul while a collective on inputs of its own is in
flight ("concurrent"). Reported: speedup = unfused
/ best fused, the chunk count that won (chosen by measurement), fraction of
the limit = max(matmul, communication) / best fused, where communication is
the cheaper of the collective and the exchange (the same bytes either way,
so a cheaper exchange does not pass for overlap), the same fraction for
"concurrent" (how much overlap this machine gives two independent calls),
concurrent / best fused, and per shape the measured crossover. At the
design points, DESIGN.md's naive pipeline (a reduce_scatter per chunk of
every rank's rows, 4 and 8 chunks: the generic backend's pipeline on device
groups, forced here) runs in the same interleaving. fp32, one
thread per rank, tokens = total rows entering the matmul (m for
mm_reduce_scatter and mm_all_reduce, world_size x local rows for all_gather_mm).
mm_all_reduce moves its bytes only by the all_reduce ("exchange" is the
collective again).

Shapes (groups, for --only):
  llama: Llama-3-70B at TP=8, per-rank shapes with every dimension divided
      by 8 for this 2-core machine (hidden 8192, intermediate 28672, 64 heads,
      8 kv heads, head dim 128; tokens not scaled):
        o_proj   mm->RS  k = 8192/8/8 = 128,  n = 8192/8 = 1024  (and mm->AR)
        down     mm->RS  k = 28672/8/8 = 448, n = 8192/8 = 1024  (and mm->AR)
        qkv      AG->mm  k = 8192/8 = 1024,   n = (64+2*8)*128/8/8 = 160
        gate_up  AG->mm  k = 8192/8 = 1024,   n = 2*28672/8/8 = 896
  small: 1024x1024 and 512x2048 (k x n), every op.
  design: the four (m, k, n) mm->RS points of docs/DESIGN.md
      "Performance facts", at their m, with its naive pipeline measured in
      the same run; DESIGN.md's own numbers are stored next to them
      (compare ratios, not ms).

Token sweep 16..16384 (powers of two). Durations on this 2-core machine when
idle (measured; (1 + repeats) x 9 variants of about matmul + collective each
per point, 11 at the design points; 3-5x longer while other jobs load it):
--quick (256 and 4096 tokens, the 4 design points) ~1.5-2 min; the full
run (92 points) ~9 min, two thirds of it the 8k-16k points.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass

from devtools.launch import run_ranks
from benchmarks import cli
from fcpass import measure

logger = logging.getLogger(__name__)

WORLD_SIZE = 2
RS, AG, AR = measure.OPS
TOKENS = tuple(2**p for p in range(4, 15))  # 16 .. 16384
QUICK_TOKENS = (256, 4096)
LLAMA_SCALE = 8


@dataclass(frozen=True)
class Shape:
    group: str
    name: str
    op: str
    k: int
    n: int
    tokens: tuple[int, ...] | None = None  # fixed token counts; None: the sweep

    @property
    def key(self) -> str:
        return f"{self.op} k={self.k} n={self.n}"


def _llama(name: str, op: str, k: int, n: int) -> Shape:
    return Shape("llama", name, op, k // LLAMA_SCALE, n // LLAMA_SCALE)


SHAPES = (
    # Llama-3-70B, TP=8 per-rank (k, n), then / LLAMA_SCALE.
    _llama("o_proj", RS, 8192 // 8, 8192),
    _llama("down_proj", RS, 28672 // 8, 8192),
    _llama("o_proj", AR, 8192 // 8, 8192),
    _llama("down_proj", AR, 28672 // 8, 8192),
    _llama("qkv_proj", AG, 8192, (64 + 2 * 8) * 128 // 8),
    _llama("gate_up_proj", AG, 8192, 2 * 28672 // 8),
    *(Shape("small", f"{k}x{n}", op, k, n) for op in measure.OPS for k, n in ((1024, 1024), (512, 2048))),
    *(Shape("design", f"m={m} k={k} n={n}", RS, k, n, (m,))
      for m, k, n in ((1024, 1024, 1024), (4096, 512, 2048), (4096, 1024, 1024), (8192, 512, 1024))),
)
GROUPS = ("llama", "small", "design")

# docs/DESIGN.md "Performance facts": 2 gloo ranks, fp32, naive pipeline; (m, k, n) -> ms.
NAIVE_PIPELINE_BASELINE = {
    (1024, 1024, 1024): {"matmul": 22, "reduce_scatter": 12, "unfused": 32, "chunks_4": 36, "chunks_8": 44},
    (4096, 512, 2048): {"matmul": 112, "reduce_scatter": 106, "unfused": 161, "chunks_4": 131, "chunks_8": 136},
    (4096, 1024, 1024): {"matmul": 105, "reduce_scatter": 37, "unfused": 135, "chunks_4": 125, "chunks_8": 147},
    (8192, 512, 1024): {"matmul": 113, "reduce_scatter": 85, "unfused": 180, "chunks_4": 139, "chunks_8": 147},
}


def baseline_summary(m: int, k: int, n: int) -> dict:
    ms = NAIVE_PIPELINE_BASELINE[(m, k, n)]
    best = min(ms["chunks_4"], ms["chunks_8"])
    return {"ms": ms, "speedup": ms["unfused"] / best,
            "fraction_of_limit": max(ms["matmul"], ms["reduce_scatter"]) / best}


NAIVE_CHUNKS = (4, 8)  # the two counts DESIGN.md measured


def repeats_for(tokens: int) -> int:
    """Fewer repeats where one call already takes long (one sample varies by ~15 % here, so not too few)."""
    return 9 if tokens <= 1024 else 7 if tokens <= 4096 else 5


def measure_point(shape: Shape, tokens: int, world_size: int) -> dict:
    point = measure.Point(shape.op, tokens, shape.k, shape.n, world_size)
    variants = {"unfused": point.unfused(), "matmul": point.matmul(), "collective": point.collective(),
                "concurrent": point.concurrent(), **point.fused_variants()}
    variants["exchange"] = point.exchange()
    if shape.group == "design":
        variants.update({naive_name(c): point.naive_pipeline(c) for c in NAIVE_CHUNKS})
    ms = measure.medians(variants, repeats_for(tokens))
    best_chunks, best, fused = measure.best_fused(ms)
    # The bytes move either way; the limit takes the cheaper (the fused path exchanges, the unfused one
    # runs the collective), so a cheaper exchange cannot pass for overlap.
    comm = min(ms["collective"], ms["exchange"])
    limit = max(ms["matmul"], comm)
    result = {
        "op": shape.op, "group": shape.group, "shape": shape.name, "k": shape.k, "n": shape.n, "tokens": tokens,
        "matmul_ms": ms["matmul"], "collective_ms": ms["collective"], "exchange_ms": ms["exchange"],
        "concurrent_ms": ms["concurrent"], "unfused_ms": ms["unfused"], "fused_ms": fused,
        "best_chunks": best_chunks, "best_fused_ms": best,
        "speedup": ms["unfused"] / best, "fraction_of_limit": limit / best,
        # How much overlap the machine gives two independent calls, and the pipeline against that.
        "concurrent_fraction_of_limit": limit / ms["concurrent"], "fused_vs_concurrent": ms["concurrent"] / best,
    }
    if shape.group == "design":
        naive = {c: ms[naive_name(c)] for c in NAIVE_CHUNKS}
        naive_chunks = min(naive, key=naive.get)
        result["naive_pipeline"] = {"ms": {str(c): t for c, t in naive.items()}, "best_chunks": naive_chunks,
                                    "speedup": ms["unfused"] / naive[naive_chunks],
                                    "fraction_of_limit": limit / naive[naive_chunks]}
        result["vs_naive"] = naive[naive_chunks] / best
        result["naive_pipeline_baseline"] = baseline_summary(tokens, shape.k, shape.n)
    return result


def naive_name(chunks: int) -> str:
    return f"naive_{chunks}"


def plan(shapes, sweep) -> list[tuple[Shape, int]]:
    return [(shape, tokens) for shape in shapes for tokens in (shape.tokens or sweep)]


@measure.rank_main
def bench_rank(rank: int, world_size: int, points) -> list[dict]:
    results = []
    for shape, tokens in points:
        result = measure_point(shape, tokens, world_size)
        results.append(result)
        logger.info("[%d/%d] %s %s tokens=%d: speedup %.2fx (%d chunks), %.2f of limit", len(results),
                    len(points), shape.op, shape.name, tokens, result["speedup"], result["best_chunks"],
                    result["fraction_of_limit"])
    return results


def crossovers(shapes, points: list[dict]) -> dict[str, int | None]:
    """Per swept shape: the smallest measured token count from which fused stays ahead."""
    return {
        shape.key: measure.crossover([(p["tokens"], p["speedup"]) for p in points
                                      if (p["op"], p["k"], p["n"], p["shape"]) == (shape.op, shape.k, shape.n,
                                                                                  shape.name)])
        for shape in shapes if shape.tokens is None
    }


def plot(shapes, points: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in shapes:
        if shape.tokens is not None:
            continue
        series = sorted((p for p in points if (p["op"], p["shape"]) == (shape.op, shape.name)),
                        key=lambda p: p["tokens"])
        ax.plot([p["tokens"] for p in series], [p["speedup"] for p in series], marker="o",
                label=f"{shape.op} {shape.name} (k={shape.k} n={shape.n})")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("unfused / fused time")
    ax.set_title("fcpass generic pipeline, 2 gloo ranks, fp32")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def select(only: str | None, op: str | None) -> tuple[Shape, ...]:
    groups = GROUPS
    if only:
        groups = tuple(g.strip() for g in only.split(","))
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise argparse.ArgumentTypeError(f"--only: unknown group(s) {unknown}; groups: {list(GROUPS)}")
    if op is not None and op not in measure.OPS:
        raise argparse.ArgumentTypeError(f"--op: {op!r} is not one of {list(measure.OPS)}")
    return tuple(s for s in SHAPES if s.group in groups and (op is None or s.op == op))


def print_table(points: list[dict]) -> None:
    """One row per point; design points also give the naive pipeline's speedup, here and in DESIGN.md's run."""
    print(f"\n{'op':<18} {'shape':<22} {'k':>5} {'n':>5} {'tokens':>6} {'matmul':>8} {'collect':>8} {'exch':>8} "
          f"{'unfused':>8} {'concur':>8} {'fused':>8} {'chunks':>6} {'speedup':>7} {'of limit':>8} "
          f"{'c. of l.':>8} {'conc/f':>7} {'naive':>7} {'design':>7}")
    for p in points:
        naive, design = p.get("naive_pipeline"), p.get("naive_pipeline_baseline")
        print(f"{p['op']:<18} {p['shape']:<22} {p['k']:>5} {p['n']:>5} {p['tokens']:>6} {p['matmul_ms']:>8.1f} "
              f"{p['collective_ms']:>8.1f} {p['exchange_ms']:>8.1f} {p['unfused_ms']:>8.1f} "
              f"{p['concurrent_ms']:>8.1f} {p['best_fused_ms']:>8.1f} {p['best_chunks']:>6} {p['speedup']:>6.2f}x "
              f"{p['fraction_of_limit']:>8.2f} {p['concurrent_fraction_of_limit']:>8.2f} "
              f"{p['fused_vs_concurrent']:>7.2f} "
              + (f"{naive['speedup']:>6.2f}x {design['speedup']:>6.2f}x" if naive else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"swept shapes at tokens {QUICK_TOKENS} only (~1 min)")
    parser.add_argument("--tokens", help="comma-separated token counts for the swept shapes (even numbers)")
    parser.add_argument("--only", help=f"comma-separated shape groups, of {list(GROUPS)}")
    parser.add_argument("--op", help=f"one op family, of {list(measure.OPS)}")
    parser.add_argument("--out", default=os.path.join(cli.RESULTS_DIR, "ops.json"))
    args = parser.parse_args(argv)
    try:
        shapes = select(args.only, args.op)
        sweep = QUICK_TOKENS if args.quick else TOKENS
        if args.tokens:
            sweep = cli.int_list(args.tokens, "--tokens", multiple_of=WORLD_SIZE)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not shapes:
        parser.error(f"no shape is in --only {args.only} with --op {args.op}")
    cli.setup_logging()
    todo = plan(shapes, sweep)
    logger.info("%d points on %d gloo ranks", len(todo), WORLD_SIZE)
    points = run_ranks(bench_rank, WORLD_SIZE, todo, timeout=4 * 3600)[0]
    result = {
        **cli.machine(), "world_size": WORLD_SIZE, "dtype": "float32",
        "llama_scaling": f"Llama-3-70B TP=8 per-rank k and n divided by {LLAMA_SCALE}; tokens not scaled",
        "shapes": [asdict(s) for s in shapes],
        "points": points, "crossover_tokens": crossovers(shapes, points),
        "naive_pipeline_baseline": {"source": "docs/DESIGN.md Performance facts", "ms": [
            {"m": m, "k": k, "n": n, **ms} for (m, k, n), ms in NAIVE_PIPELINE_BASELINE.items()]},
    }
    cli.write_json(args.out, result)
    print_table(points)
    print("\ncrossover (fused ahead from):", json.dumps(result["crossover_tokens"]))
    png = os.path.splitext(args.out)[0] + ".png"
    print(f"wrote {args.out}" + (f" and {png}" if plot(shapes, points, png) else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
