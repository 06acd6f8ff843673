"""Demo: the fused ops on 2 gloo ranks, both sides of the token threshold.

    python -m examples.ops_demo

For each token count it prints, per op, the guard's decision (the same on
every rank), the max relative error against matmul + plain collective, and
the time of the fused op vs the unfused path. The model demo is
``python -m examples.demo``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from devtools.launch import run_ranks

TOKENS = (64, 512, 2048, 4096, 8192)
THRESHOLD = 2048
K, N = 1024, 1024
REPEATS = 3


def _timed(fn):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPEATS):
        result = fn()
    dist.barrier()
    return result, (time.perf_counter() - start) / REPEATS * 1e3


def demo_rank(rank: int, world_size: int, tokens, threshold: int) -> list[dict]:
    import fcpass

    name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(rank)
    w_row = torch.randn(K, N, generator=g) / K**0.5
    bias = torch.randn(N, generator=g) if rank == 0 else None  # vLLM's RowParallelLinear: rank 0 only
    w_col = torch.randn(K, N, generator=torch.Generator().manual_seed(99)) / K**0.5
    never = 1 << 24
    rows = []
    for m in tokens:
        x = torch.randn(m, K, generator=g)
        for op, call in (
            ("mm_reduce_scatter", lambda t: torch.ops.fcpass.mm_reduce_scatter(x, w_row, bias, name, world_size, t)),
            ("all_gather_mm",
             lambda t: torch.ops.fcpass.all_gather_mm(x[: m // world_size], [w_col], [None], name, world_size, t)[1][0]),
            ("mm_all_reduce", lambda t: torch.ops.fcpass.mm_all_reduce(x, w_row, bias, name, t)),
        ):
            call(threshold), call(never)  # warm-up: first-call allocations stay out of the timings
            fcpass.reset_decision_counts()
            guarded, guarded_ms = _timed(lambda: call(threshold))
            (decision,) = fcpass.decision_counts()
            unfused, unfused_ms = _timed(lambda: call(never))
            error = ((guarded - unfused).abs().max() / unfused.abs().max()).item()
            rows.append({"tokens": m, "op": op, "path": decision[1], "reason": decision[2],
                         "error": error, "guarded_ms": guarded_ms, "unfused_ms": unfused_ms})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--threshold", type=int, default=THRESHOLD)
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    per_rank = run_ranks(demo_rank, 2, tokens, args.threshold, timeout=600)
    print(f"2 gloo ranks, fp32, k={K} n={N}, threshold_tokens={args.threshold} (fuse when tokens > threshold)")
    print(f"{'tokens':>7} {'op':<18} {'decision':<9} {'same on all ranks':<18} {'max rel err':>11} "
          f"{'op ms':>8} {'unfused ms':>10}")
    for rows in zip(*per_rank):
        r = rows[0]
        agree = len({(x["path"], x["reason"]) for x in rows}) == 1
        print(f"{r['tokens']:>7} {r['op']:<18} {r['path']:<9} {str(agree):<18} "
              f"{max(x['error'] for x in rows):>11.2e} {r['guarded_ms']:>8.1f} {r['unfused_ms']:>10.1f}")


if __name__ == "__main__":
    main()
