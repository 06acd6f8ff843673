"""Fused (generic pipeline) vs unfused fcpass ops on 2 gloo ranks, side by side.

    python benchmarks/ops.py [--quick] [--tokens 64,256,...] [--out benchmarks/results/ops.json]

Per (op, shape, tokens) point, measured interleaved in one run so machine
noise hits every variant alike: the unfused path (matmul + collective), the
fused path at each candidate chunk count, and the matmul and the collective
alone. Reported: speedup = unfused / best fused, the chunk count that won,
and fraction of the limit = max(matmul, collective) / best fused (1.0 would
be perfect overlap). fp32, one thread per rank, tokens = total rows entering
the matmul (m for mm_reduce_scatter, world_size x local rows for all_gather_mm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fcpass.launch import run_ranks  # noqa: E402

WORLD_SIZE = 2
SHAPES = ((1024, 1024), (512, 2048))  # (k, n)
TOKENS = tuple(2**p for p in range(6, 15))  # 64 .. 16384
QUICK_TOKENS = (256, 4096)
CHUNK_CANDIDATES = (2, 4, 8)
NEVER_FUSE, ALWAYS_FUSE = 1 << 24, 0
OPS = ("mm_reduce_scatter", "all_gather_mm")


def _repeats(tokens: int) -> int:
    """Fewer repeats where one call already takes long."""
    return 7 if tokens <= 1024 else 5 if tokens <= 4096 else 3


def _time_ms(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank is the op's time
    return elapsed.item() * 1e3


def _variants(op: str, tokens: int, k: int, n: int, world_size: int):
    """name -> zero-arg callable, for one point; every variant computes on the same tensors."""
    import fcpass

    name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(dist.get_rank())
    w = torch.randn(k, n, generator=g) / k**0.5
    if op == "mm_reduce_scatter":
        x = torch.randn(tokens, k, generator=g)
        product = x @ w
        shard = product.new_empty((tokens // world_size, n))
        run = lambda t: torch.ops.fcpass.mm_reduce_scatter(x, w, None, name, world_size, t)  # noqa: E731
        collective = lambda: dist.reduce_scatter_tensor(shard, product)  # noqa: E731
        matmul = lambda: x @ w  # noqa: E731
    else:
        x = torch.randn(tokens // world_size, k, generator=g)
        gathered = x.new_empty((tokens, k))
        run = lambda t: torch.ops.fcpass.all_gather_mm(x, [w], [None], name, world_size, t)  # noqa: E731
        collective = lambda: dist.all_gather_into_tensor(gathered, x)  # noqa: E731
        matmul = lambda: gathered @ w  # noqa: E731

    def fused(chunks):
        def call():
            fcpass.configure(fcpass.PassConfig(pipeline_chunks=chunks))
            run(ALWAYS_FUSE)
        return call

    variants = {"unfused": lambda: run(NEVER_FUSE), "matmul": matmul, "collective": collective}
    variants.update({f"fused_{c}": fused(c) for c in CHUNK_CANDIDATES})
    return variants


def measure_point(op: str, tokens: int, k: int, n: int, world_size: int) -> dict:
    variants = _variants(op, tokens, k, n, world_size)
    for fn in variants.values():  # warm-up
        fn()
    samples = {name: [] for name in variants}
    for _ in range(_repeats(tokens)):
        for name, fn in variants.items():  # interleaved: noise lands on every variant alike
            samples[name].append(_time_ms(fn))
    ms = {name: statistics.median(values) for name, values in samples.items()}
    fused = {str(c): ms[f"fused_{c}"] for c in CHUNK_CANDIDATES}
    best_chunks = min(fused, key=fused.get)
    best = fused[best_chunks]
    limit = max(ms["matmul"], ms["collective"])
    return {
        "op": op, "k": k, "n": n, "tokens": tokens,
        "matmul_ms": ms["matmul"], "collective_ms": ms["collective"], "unfused_ms": ms["unfused"],
        "fused_ms": fused, "best_chunks": int(best_chunks), "best_fused_ms": best,
        "speedup": ms["unfused"] / best, "fraction_of_limit": limit / best,
    }


def bench_rank(rank: int, world_size: int, tokens_list) -> list[dict]:
    points = []
    total = len(OPS) * len(SHAPES) * len(tokens_list)
    for op in OPS:
        for k, n in SHAPES:
            for tokens in tokens_list:
                point = measure_point(op, tokens, k, n, world_size)
                points.append(point)
                if rank == 0:
                    print(f"[{len(points)}/{total}] {op} k={k} n={n} tokens={tokens}: "
                          f"speedup {point['speedup']:.2f}x", flush=True)
    return points


def crossovers(points: list[dict]) -> dict[str, int | None]:
    """Per op/shape: the smallest measured token count from which fused stays ahead."""
    result = {}
    for op in OPS:
        for k, n in SHAPES:
            series = sorted((p for p in points if (p["op"], p["k"], p["n"]) == (op, k, n)), key=lambda p: p["tokens"])
            ahead = None
            for p in reversed(series):
                if p["speedup"] <= 1.0:
                    break
                ahead = p["tokens"]
            result[f"{op} k={k} n={n}"] = ahead
    return result


def plot(points: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for op in OPS:
        for k, n in SHAPES:
            series = sorted((p for p in points if (p["op"], p["k"], p["n"]) == (op, k, n)), key=lambda p: p["tokens"])
            ax.plot([p["tokens"] for p in series], [p["speedup"] for p in series], marker="o", label=f"{op} k={k} n={n}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("unfused / fused time")
    ax.set_title("fcpass generic pipeline, 2 gloo ranks, fp32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only tokens {QUICK_TOKENS}")
    parser.add_argument("--tokens", help="comma-separated token counts (multiples of 2)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ops.json"))
    args = parser.parse_args(argv)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    points = run_ranks(bench_rank, WORLD_SIZE, tokens, timeout=1800)[0]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "world_size": WORLD_SIZE, "dtype": "float32", "threads_per_rank": 1, "backend": "gloo",
        "points": points, "crossover_tokens": crossovers(points),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'op':<18} {'k':>5} {'n':>5} {'tokens':>6} {'matmul':>8} {'collect':>8} {'unfused':>8} "
          f"{'fused':>8} {'chunks':>6} {'speedup':>7} {'of limit':>8}")
    for p in points:
        print(f"{p['op']:<18} {p['k']:>5} {p['n']:>5} {p['tokens']:>6} {p['matmul_ms']:>8.1f} {p['collective_ms']:>8.1f} "
              f"{p['unfused_ms']:>8.1f} {p['best_fused_ms']:>8.1f} {p['best_chunks']:>6} {p['speedup']:>6.2f}x "
              f"{p['fraction_of_limit']:>8.2f}")
    print("\ncrossover (fused ahead from):", json.dumps(result["crossover_tokens"]))
    png = os.path.splitext(args.out)[0] + ".png"
    print(f"wrote {args.out}" + (f" and {png}" if plot(points, png) else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
