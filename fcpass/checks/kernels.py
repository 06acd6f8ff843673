"""The fused ops against a float64 reference, in one rank: the part the hardware checks share.

The Ascend check (fcpass/checks/ascend.py) runs it on NPU ranks over HCCL, the GPU check (fcpass/checks/gpu.py)
on CUDA ranks over NCCL; on CPU ranks over gloo (the generic backend) it is how both are tested off hardware. Every rank rebuilds every rank's seeded inputs on the CPU for the reference, so the error
is the op's, not the reference's.
"""

from __future__ import annotations

import statistics
import time

import torch

from fcpass.measure import synchronize

SUM = "mm_sum_reduce_scatter"  # Falcon's scatter after the sum of two products (float dtypes only)
OPS = ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce", SUM)
ROW_PARALLEL = ("mm_reduce_scatter", "mm_all_reduce", SUM)
SECOND_PRODUCT_SEED = 1000  # the sum's second product: the inputs of a reduce_scatter case with this seed offset
K, N, REPEATS = 1024, 1024, 10
W8A8_FORMS = ("per_tensor", "per_token")


def inputs(rank: int, world_size: int, op: str, tokens: int, dtype, form: str | None, seed: int, k: int = K,
           n: int = N):
    """Rank ``rank``'s x, w, bias and scales, on the CPU."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    rows = tokens // world_size if op == "all_gather_mm" else tokens
    row_parallel = op in ROW_PARALLEL
    if form is None:
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = (torch.randn(k, n, generator=torch.Generator().manual_seed(seed if not row_parallel else seed + rank))
             / k ** 0.5).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if (rank == 0 or not row_parallel) else None
        return x, w, bias, None, None
    x = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (k, n), generator=torch.Generator().manual_seed(seed + (rank if row_parallel else 0)),
                      dtype=torch.int8)
    bias = torch.randint(-4000, 4000, (n,), generator=g, dtype=torch.int32) if rank == 0 and row_parallel else None
    x_scale = (torch.rand(rows, 1, generator=g) + 0.5) / 100 if form == "per_token" else torch.tensor(0.02)
    w_scale = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 7)) + 0.5) / 100
    return x, w, bias, x_scale, w_scale


def case_inputs(rank: int, world_size: int, op: str, tokens: int, dtype, form: str | None, seed: int, k: int = K,
                n: int = N) -> list:
    """What :func:`call` takes for ``op``: :func:`inputs`, and for the sum its second product's x, w, bias."""
    found = list(inputs(rank, world_size, op, tokens, dtype, form, seed, k, n))
    if op == SUM:
        found += inputs(rank, world_size, op, tokens, dtype, form, seed + SECOND_PRODUCT_SEED, k, n)[:3]
    return found


def reference(op: str, world_size: int, tokens: int, dtype, form, seed: int, rank: int, k: int, n: int):
    per_rank = [inputs(r, world_size, op, tokens, dtype, form, seed, k, n) for r in range(world_size)]

    def product(x, w, bias, x_scale, w_scale):
        y = x.double() @ w.double()
        if form is not None:
            return (y + (0 if bias is None else bias.double())) * x_scale.double().reshape(-1, 1) * w_scale.double()
        return y if bias is None else y + bias.double()

    if op == "all_gather_mm":  # this rank's weight over every rank's rows (a per-tensor x_scale only)
        _, w, bias, x_scale, w_scale = per_rank[rank]
        return product(torch.cat([p[0] for p in per_rank]), w, bias, x_scale, w_scale)
    total = sum(product(*p) for p in per_rank)
    if op == SUM:
        total = total + sum(product(*inputs(r, world_size, op, tokens, dtype, form, seed + SECOND_PRODUCT_SEED, k, n))
                            for r in range(world_size))
    if op in ("mm_reduce_scatter", SUM):
        shard = tokens // world_size
        return total[rank * shard:(rank + 1) * shard]
    return total


def call(op: str, form, name: str, world_size: int, args, threshold: int):
    """The fused op of ``op`` on ``args`` (x, w, bias, x_scale, w_scale, then the sum's second x, w, bias)
    (``threshold`` -1: the config's / backend's; huge: the unfused path)."""
    fc = torch.ops.fcpass
    x, w, bias, x_scale, w_scale, *second = args
    if op == SUM:
        x2, w2, bias2 = second
        return fc.mm_sum_reduce_scatter([x, x2], [w, w2], [bias, bias2], name, world_size, threshold)
    if form is None:
        if op == "mm_reduce_scatter":
            return fc.mm_reduce_scatter(x, w, bias, name, world_size, threshold)
        if op == "mm_all_reduce":
            return fc.mm_all_reduce(x, w, bias, name, threshold)
        return fc.all_gather_mm(x, [w], [bias], name, world_size, threshold)[1][0]
    out = torch.bfloat16
    if op == "mm_reduce_scatter":
        return fc.mm_reduce_scatter_scaled(x, w, x_scale, w_scale, bias, out, name, world_size, threshold)
    if op == "mm_all_reduce":
        return fc.mm_all_reduce_scaled(x, w, x_scale, w_scale, bias, out, name, threshold)
    return fc.all_gather_scaled_mm(x, x_scale, [w], [w_scale], [bias], out, name, world_size, threshold)[1][0]


def timed_ms(fn, device_type: str, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, the device synchronized around each call, after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize(device_type)
        start = time.perf_counter()
        fn()
        synchronize(device_type)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def cases(float_dtypes) -> list[tuple]:
    """(op, dtype, W8A8 form): every op in each float dtype, and W8A8 per-tensor and (where it exists)
    per-token."""
    found = [(op, dtype, None) for op in OPS for dtype in float_dtypes]
    return found + [(op, torch.int8, form) for op in OPS for form in W8A8_FORMS
                    if op != SUM and not (op == "all_gather_mm" and form == "per_token")]


def kernels_rank(rank: int, world_size: int, tokens_list, device_type: str, backend: str,
                 threshold_tokens: int | None = None, shape=(K, N), repeats: int = REPEATS, float_dtypes=None,
                 groups=None, **config_fields) -> list[dict]:
    """Every case in this rank (started by devtools.launch.run_ranks): the decision, the max relative error
    vs float64, and the times of the guarded op and of its unfused path. ``groups``: lists of global ranks
    partitioning the world (e.g. [[0, 2], [1, 3]], vllm-ascend's fine-grained TP groups across DP ranks): each
    case runs on this rank's group, a communicator other than the world's. ``config_fields``: more PassConfig
    fields (e.g. ``cuda_symmetric_memory``)."""
    import torch.distributed as dist

    import fcpass

    k, n = shape
    if device_type != "cpu":
        getattr(torch, device_type).set_device(rank)
    fcpass.configure(fcpass.PassConfig(backend=backend, threshold_tokens=threshold_tokens, **config_fields))
    group = dist.group.WORLD
    if groups:
        made = [dist.new_group(ranks) for ranks in groups]  # every rank makes every group, in one order
        group = next(g for g, ranks in zip(made, groups) if rank in ranks)
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    name = group.group_name
    float_dtypes = float_dtypes or ((torch.float32, torch.bfloat16) if device_type == "cpu"
                                    else (torch.float16, torch.bfloat16))
    rows = []
    for seed, ((op, dtype, form), tokens) in enumerate((c, t) for c in cases(float_dtypes) for t in tokens_list):
        args = [None if t is None else t.to(device_type)
                for t in case_inputs(rank, world_size, op, tokens, dtype, form, seed, k, n)]
        fcpass.reset_decision_counts()
        got = call(op, form, name, world_size, args, threshold=-1)
        (decision,) = fcpass.decision_counts()
        ref = reference(op, world_size, tokens, dtype, form, seed, rank, k, n)
        error = ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        rows.append({"op": op, "dtype": str(dtype).removeprefix("torch."), "w8a8": form or "-", "tokens": tokens,
                     "path": decision[1], "reason": decision[2], "error": error,
                     "guarded_ms": timed_ms(lambda: call(op, form, name, world_size, args, threshold=-1),
                                            device_type, repeats),
                     "unfused_ms": timed_ms(lambda: call(op, form, name, world_size, args, threshold=1 << 24),
                                            device_type, repeats)})
    return rows


def merged(per_rank: list[list[dict]]) -> list[dict]:
    """Rank 0's rows, each with whether every rank took the same path and the largest error of any rank."""
    for rows in zip(*per_rank):
        rows[0]["ranks_agree"] = len({(r["path"], r["reason"]) for r in rows}) == 1
        rows[0]["error"] = max(r["error"] for r in rows)
    return per_rank[0]


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
