"""The GPU check: what fcpass cannot verify without an NVIDIA GPU, in one run.

    python -m fcpass.checks.gpu [--tokens 512,4096] [--shape 1024,1024] [--repeats 10]

(or ``fcpass-gpu-check``; ``make gpu-check`` in a checkout).

On one GPU (a one-rank NCCL group):
1. every fused op (bf16/fp16 and W8A8) on CUDA tensors through the CUDA backend, below and above the
   threshold (1024): the path it took and why (torch's symmetric-memory kernels only where
   ``PassConfig.cuda_symmetric_memory`` asks, else the generic pipeline on NCCL), the max relative error vs
   float64, the guarded op's and its unfused path's time, next to the plain matmul's;
2. each op under CUDA-graph capture (as vLLM captures decode graphs): captured after one eager call,
   replayed on new inputs, compared with the eager result.
On 2+ GPUs, also:
3. the kernels on 2 ranks over NCCL, with ``cuda_symmetric_memory`` off and on;
4. below the threshold at decode sizes, with vLLM's TP group (its CUDA communicator: custom all-reduce,
   pynccl): ``torch.mm`` + vLLM's ``all_reduce`` against ``fcpass.mm_all_reduce`` at that site (its
   ``site`` naming vLLM's op), eager and each captured in a CUDA graph inside vLLM's ``graph_capture``:
   the same bits, and the time per call of each (what a decode step pays for the guard). Needs vLLM.

Without a GPU it runs what a CPU can (parts 1 and 3 on gloo ranks through the generic backend: the cases,
references and table) and says which parts need a GPU. Prints one table per part, to send back.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fcpass.checks import kernels
from fcpass.checks.kernels import table

NEEDS_A_GPU = ("the CUDA backend (symmetric memory, the NCCL pipeline), CUDA tensors", "CUDA-graph capture",
               "2 ranks over NCCL", "vLLM's CUDA communicator under the unfused path")
DECODE_TOKENS = (1, 8, 32)


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def kernels_rank(rank: int, world_size: int, tokens_list, device_type: str, symmetric_memory: bool = False,
                 shape=(kernels.K, kernels.N), repeats: int = kernels.REPEATS) -> list[dict]:
    """Part 1 (one rank) or 3: the cases, each row with the plain matmul's time on this rank's x and w."""
    backend = "cuda" if device_type == "cuda" else "generic"
    rows = kernels.kernels_rank(rank, world_size, tokens_list, device_type, backend, None, shape, repeats,
                                cuda_symmetric_memory=symmetric_memory)
    for row in rows:
        row["symmetric_memory"] = symmetric_memory
        if row["w8a8"] == "-":
            dtype = getattr(torch, row["dtype"])
            x = torch.randn(row["tokens"], shape[0], dtype=dtype, device=device_type)
            w = torch.randn(shape[0], shape[1], dtype=dtype, device=device_type)
            row["matmul_ms"] = kernels.timed_ms(lambda: x @ w, device_type, repeats)
        else:
            row["matmul_ms"] = float("nan")
    return rows


def capture_rank(rank: int, world_size: int, tokens_list, shape=(kernels.K, kernels.N)) -> list[dict]:
    """Part 2: each plain op captured in a CUDA graph after one eager call, replayed on new inputs."""
    import torch.distributed as dist

    import fcpass

    torch.cuda.set_device(rank)
    fcpass.configure(fcpass.PassConfig(backend="cuda"))
    name, rows = dist.group.WORLD.group_name, []
    for op in kernels.OPS:
        for seed, tokens in enumerate(tokens_list):
            static = [None if t is None else t.cuda() for t in kernels.case_inputs(
                rank, world_size, op, tokens, torch.bfloat16, None, seed, *shape)]

            def run():
                return kernels.call(op, None, name, world_size, static, threshold=-1)

            row = {"op": op, "tokens": tokens}
            try:
                run()  # plans the call, outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = run()
                fresh = kernels.case_inputs(rank, world_size, op, tokens, torch.bfloat16, None, seed + 1, *shape)
                for held, new in zip(static, fresh):
                    if held is not None:
                        held.copy_(new)
                graph.replay()
                torch.cuda.synchronize()
                eager = run()
                row.update(captured=True, error=((out.float() - eager.float()).abs().max()
                                                 / eager.float().abs().max()).item(), failure="-")
            except Exception as e:  # a row to send back, not a crash: the next op still runs
                row.update(captured=False, error=float("nan"), failure=f"{type(e).__name__}: {e}"[:120])
            rows.append(row)
    return rows


def below_threshold_rank(rank: int, world_size: int, tokens_list, device_type: str,
                         shape=(kernels.K, kernels.N), repeats: int = kernels.REPEATS) -> list[dict]:
    """Part 4: vLLM's site (torch.mm + vLLM's all_reduce on its TP group) and fcpass's op at it, below the
    threshold: the same bits, and each one's time; on CUDA also each captured in a CUDA graph in vLLM's
    graph_capture (what vLLM does for decode sizes)."""
    import fcpass
    from fcpass.checks.vllm_group import vllm_tp_group
    from fcpass.limits import MAX_THRESHOLD_TOKENS

    if device_type == "cuda":
        torch.cuda.set_device(rank)
    rows = []
    backend = "nccl" if device_type == "cuda" else "gloo"
    with vllm_tp_group(rank, world_size, backend) as tp, torch.inference_mode():
        fcpass.configure(fcpass.PassConfig())
        group, op = tp.unique_name, torch.ops.fcpass.mm_all_reduce
        for tokens in tokens_list:
            g = torch.Generator().manual_seed(tokens + 1000 * rank)
            x = torch.randn(tokens, shape[0], generator=g).to(torch.bfloat16).to(device_type)
            w = torch.randn(shape[0], shape[1], generator=g).to(torch.bfloat16).to(device_type)
            variants = {"vllm_site": lambda: torch.ops.vllm.all_reduce(torch.mm(x, w), group),
                        "fcpass_op": lambda: op(x, w, None, group, MAX_THRESHOLD_TOKENS, "", "vllm/mm")}
            outs = {name: fn() for name, fn in variants.items()}
            row = {"tokens": tokens, "same_bits": bool(torch.equal(outs["vllm_site"], outs["fcpass_op"]))}
            for name, fn in variants.items():
                row[f"{name}_ms"] = kernels.timed_ms(fn, device_type, repeats)
            if device_type == "cuda":
                row.update(_captured(tp, variants, device_type, repeats))
            rows.append(row)
    return rows


def _captured(tp, variants, device_type: str, repeats: int) -> dict:
    """Each variant captured in a CUDA graph inside vLLM's graph_capture, replayed: bits and ms per replay."""
    graphs, outs, row = {}, {}, {}
    try:
        with tp.graph_capture():
            for name, fn in variants.items():
                fn()  # planned outside the capture, as vLLM runs each size eagerly first
                torch.cuda.synchronize()
                graphs[name] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[name]):
                    outs[name] = fn()
        for name, graph in graphs.items():
            graph.replay()
            row[f"{name}_captured_ms"] = kernels.timed_ms(graph.replay, device_type, repeats)
        torch.cuda.synchronize()
        row["captured_same_bits"] = bool(torch.equal(outs["vllm_site"], outs["fcpass_op"]))
    except Exception as e:  # a row to send back, not a crash
        row["capture_failure"] = f"{type(e).__name__}: {e}"[:160]
    return row


def run(tokens, shape=(kernels.K, kernels.N), repeats: int = kernels.REPEATS) -> dict[str, list]:
    """Every part this machine can run: {title: rows}."""
    from fcpass.local_ranks import run_ranks

    count = gpus()
    device, backend = ("cuda", "nccl") if count else ("cpu", "gloo")
    ms = f"ms: median of {repeats} calls"
    parts = {f"1. fcpass ops, 1 rank ({backend}, {device}) (error: max relative vs float64; {ms})":
             run_ranks(kernels_rank, 1, tokens, device, False, shape, repeats, backend=backend, timeout=1800)[0]}
    if count:
        parts["2. under CUDA-graph capture, 1 rank (error: replay vs eager)"] = run_ranks(
            capture_rank, 1, tokens, shape, backend="nccl", timeout=1800)[0]
    if count != 1:
        for symmetric_memory in ((False, True) if count else (False,)):
            per_rank = run_ranks(kernels_rank, 2, tokens, device, symmetric_memory, shape, repeats,
                                 backend=backend, timeout=1800)
            title = f"3. fcpass ops, 2 ranks ({backend}, {device}), cuda_symmetric_memory={symmetric_memory} ({ms})"
            parts[title] = kernels.merged(per_rank)
    if count != 1 and _has_vllm():
        parts[f"4. below the threshold: vLLM's all_reduce site vs fcpass's op at it, 2 ranks ({backend}, {device}) "
              f"({ms})"] = run_ranks(below_threshold_rank, 2, DECODE_TOKENS, device, shape, repeats,
                                     backend=backend, timeout=1800)[0]
    return parts


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found.add_argument("--tokens", default="512,4096", help="token counts (even): below and above the threshold")
    found.add_argument("--shape", default=f"{kernels.K},{kernels.N}", help="k,n of the matmuls")
    found.add_argument("--repeats", type=int, default=kernels.REPEATS, help="timed calls per case")
    return found


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    print(preamble(gpus()))
    parts = run([int(t) for t in args.tokens.split(",")], tuple(int(d) for d in args.shape.split(",")), args.repeats)
    for title, rows in parts.items():
        print(f"\n{title}\n{table(rows)}")
    return 0


def preamble(count: int) -> str:
    """What this run covers, and (without a GPU, or with one) what it leaves out."""
    if not count:
        return ("gpu-check: no CUDA GPU here; running the parts a CPU can (gloo ranks, the generic backend). "
                "Needs a GPU: " + "; ".join(NEEDS_A_GPU) + ".")
    return f"gpu-check: {count} GPU(s): {torch.cuda.get_device_name(0)}" + ("; part 3 needs 2" if count == 1 else "")


if __name__ == "__main__":
    sys.exit(main())
