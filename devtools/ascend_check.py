"""The Ascend hardware check: what fcpass cannot verify without an NPU, in one run (``make ascend-check``).

    python -m devtools.ascend_check [--skip-engine] [--tokens 512,4096]

Needs a machine with 2+ Ascend NPUs (Atlas A2/A3), CANN, torch_npu and (for
part 2) vllm-ascend installed. It prints one table to send back.

1. The kernels, on 2 NPU ranks over HCCL: each fused op through fcpass's NPU
   backend (``backend="npu"``), at token counts below and above the
   threshold (1000), fp16 and bf16, and the W8A8 forms (int8 x and w,
   per-channel float32 scale, per-tensor and per-token activation scales,
   quant bias on rank 0): fused vs unfused decision, max relative error
   against a float64 reference computed on the CPU from every rank's seeded
   inputs, and the time of the guarded op and of its unfused path.
2. A small vllm-ascend model: ``vllm.LLM(tensor_parallel_size=2)`` on a random
   Llama checkpoint (written with transformers, no download), bf16, without
   and with fcpass (``PassConfig(sequence_parallel=True)``), npugraph_ex off
   in both (with it on no user pass runs): greedy tokens equal, prefill ms.

Without torch_npu or without 2 NPUs it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time

try:
    import torch
except ImportError:  # a python without torch: main() says what is missing
    torch = None

ROW_PARALLEL = ("mm_reduce_scatter", "mm_all_reduce")
K, N, WORLD_SIZE, REPEATS = 1024, 1024, 2, 10
W8A8_FORMS = ("per_tensor", "per_token")


def missing() -> str | None:
    """What this machine lacks for the check, or None."""
    if torch is None:
        return f"torch is not installed in {sys.executable}"
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (this check runs on an Ascend machine with CANN and torch_npu)"
    import torch_npu  # noqa: F401

    if not torch.npu.is_available() or torch.npu.device_count() < WORLD_SIZE:
        return f"fewer than {WORLD_SIZE} NPUs visible"
    return None


def _inputs(rank: int, op: str, tokens: int, dtype, form: str | None, seed: int, k: int = K, n: int = N):
    """Rank ``rank``'s x, w, bias and scales, on the CPU (every rank rebuilds every rank's for the reference)."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    rows = tokens // WORLD_SIZE if op == "all_gather_mm" else tokens
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


def _reference(op: str, tokens: int, dtype, form, seed: int, rank: int, k: int, n: int) -> torch.Tensor:
    per_rank = [_inputs(r, op, tokens, dtype, form, seed, k, n) for r in range(WORLD_SIZE)]

    def product(x, w, bias, x_scale, w_scale):
        y = x.double() @ w.double()
        if form is not None:
            y = (y + (0 if bias is None else bias.double())) * x_scale.double().reshape(-1, 1) * w_scale.double()
            return y
        return y if bias is None else y + bias.double()

    if op == "all_gather_mm":  # this rank's weight over every rank's rows (a per-tensor x_scale only)
        _, w, bias, x_scale, w_scale = per_rank[rank]
        return product(torch.cat([p[0] for p in per_rank]), w, bias, x_scale, w_scale)
    total = sum(product(*p) for p in per_rank)
    if op == "mm_reduce_scatter":
        shard = tokens // WORLD_SIZE
        return total[rank * shard:(rank + 1) * shard]
    return total


def _call(op: str, form, name: str, x, w, bias, x_scale, w_scale, threshold: int):
    fc = torch.ops.fcpass
    if form is None:
        if op == "mm_reduce_scatter":
            return fc.mm_reduce_scatter(x, w, bias, name, WORLD_SIZE, threshold)
        if op == "mm_all_reduce":
            return fc.mm_all_reduce(x, w, bias, name, threshold)
        return fc.all_gather_mm(x, [w], [bias], name, WORLD_SIZE, threshold)[1][0]
    out = torch.bfloat16
    if op == "mm_reduce_scatter":
        return fc.mm_reduce_scatter_scaled(x, w, x_scale, w_scale, bias, out, name, WORLD_SIZE, threshold)
    if op == "mm_all_reduce":
        return fc.mm_all_reduce_scaled(x, w, x_scale, w_scale, bias, out, name, threshold)
    return fc.all_gather_scaled_mm(x, x_scale, [w], [w_scale], [bias], out, name, WORLD_SIZE, threshold)[1][0]


def _timed_ms(fn, device_type: str, repeats: int) -> float:
    synchronize = torch.npu.synchronize if device_type == "npu" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def import_torch_npu() -> None:
    """run_ranks' setup: torch_npu registers the HCCL backend before the process group exists."""
    import torch_npu  # noqa: F401


def kernels_rank(rank: int, world_size: int, tokens_list, device_type: str = "npu",
                 threshold_tokens: int | None = None, shape=(K, N), repeats: int = REPEATS) -> list[dict]:
    """Part 1 in one rank (started by devtools.launch.run_ranks, backend "hccl"). ``device_type`` "cpu" runs
    the same cases through the generic backend on gloo (how this script is tested off hardware)."""
    k, n = shape
    import torch.distributed as dist

    import fcpass

    if device_type == "npu":
        torch.npu.set_device(rank)
    fcpass.configure(fcpass.PassConfig(backend="npu" if device_type == "npu" else "generic",
                                       threshold_tokens=threshold_tokens))
    name = dist.group.WORLD.group_name
    rows = []
    float_dtypes = (torch.float16, torch.bfloat16) if device_type == "npu" else (torch.float32, torch.bfloat16)
    cases = [(op, dtype, None) for op in ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce")
             for dtype in float_dtypes]
    cases += [(op, torch.int8, form) for op in ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce")
              for form in W8A8_FORMS if not (op == "all_gather_mm" and form == "per_token")]
    for seed, ((op, dtype, form), tokens) in enumerate((c, t) for c in cases for t in tokens_list):
        args = [None if t is None else t.to(device_type) for t in _inputs(rank, op, tokens, dtype, form, seed, k, n)]
        fcpass.reset_decision_counts()
        got = _call(op, form, name, *args, threshold=-1)
        (decision,) = fcpass.decision_counts()
        ref = _reference(op, tokens, dtype, form, seed, rank, k, n)
        error = ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        rows.append({"op": op, "dtype": str(dtype).removeprefix("torch."), "w8a8": form or "-", "tokens": tokens,
                     "path": decision[1], "reason": decision[2], "error": error,
                     "guarded_ms": _timed_ms(lambda: _call(op, form, name, *args, threshold=-1), device_type, repeats),
                     "unfused_ms": _timed_ms(lambda: _call(op, form, name, *args, threshold=1 << 24), device_type,
                                             repeats)})
    return rows


def engine_rows(model_dir: str) -> list[dict]:
    """Part 2: the model without and with fcpass, each in this process one after the other."""
    import gc

    from vllm import LLM, SamplingParams

    import fcpass.vllm

    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 1500)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    additional = {"ascend_compilation_config": {"enable_npugraph_ex": False}}
    rows, ids = [], {}
    for name, config in (("without fcpass", None), ("with fcpass", {"sequence_parallel": True})):
        kwargs = {} if config is None else {"compilation_config": fcpass.vllm.compilation_config(config)}
        llm = LLM(model=model_dir, tensor_parallel_size=WORLD_SIZE, dtype="bfloat16", seed=0,
                  skip_tokenizer_init=True, additional_config=additional, **kwargs)
        outputs = llm.generate(prompts, greedy)
        ids[name] = [list(o.outputs[0].token_ids) for o in outputs]
        start = time.perf_counter()
        llm.generate(prompts[1:], SamplingParams(temperature=0.0, max_tokens=1))
        rows.append({"engine": name, "prefill_1500_ms": (time.perf_counter() - start) * 1e3})
        del llm
        gc.collect()
    same = ids["without fcpass"] == ids["with fcpass"]
    for row in rows:
        row["greedy_tokens_equal"] = same
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,4096", help="token counts (even): below and above the threshold")
    parser.add_argument("--skip-engine", action="store_true", help="the kernels only")
    args = parser.parse_args(argv)
    problem = missing()
    if problem:
        print(f"ascend-check: nothing run: {problem}", file=sys.stderr)
        return 2
    from devtools import engine
    from devtools.launch import run_ranks

    tokens = [int(t) for t in args.tokens.split(",")]
    per_rank = run_ranks(kernels_rank, WORLD_SIZE, tokens, backend="hccl", setup=import_torch_npu, timeout=1800)
    for rows in zip(*per_rank):
        rows[0]["ranks_agree"] = len({(r["path"], r["reason"]) for r in rows}) == 1
        rows[0]["error"] = max(r["error"] for r in rows)
    print("fcpass NPU kernels, 2 ranks over HCCL (error: max relative vs float64; ms: median of", REPEATS, "calls)")
    print(table(per_rank[0]))
    if not args.skip_engine:
        with tempfile.TemporaryDirectory(prefix="fcpass-ascend-check-") as model_dir:
            engine.write_llama(model_dir, hidden=1024, layers=4, max_positions=2048)
            print("\nvllm-ascend, vllm.LLM(tensor_parallel_size=2), bf16, random Llama (hidden 1024, 4 layers)")
            print(table(engine_rows(model_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
