"""The Ascend hardware check: what fcpass cannot verify without an NPU, in one run (``make ascend-check``).

    python -m devtools.ascend_check [--skip-engine] [--tokens 512,4096]

Needs a machine with 2+ Ascend NPUs (Atlas A2/A3), CANN, torch_npu and (for
part 2) vllm-ascend installed. It prints one table to send back.

1. The kernels, on 2 NPU ranks over HCCL: each fused op through fcpass's NPU
   backend (``backend="npu"``), at token counts below and above the
   threshold (1000), fp16 and bf16, and the W8A8 forms (int8 x and w,
   per-channel float32 scale, per-tensor and per-token activation scales,
   quant bias on rank 0), and the scatter after a sum of two products
   (Falcon's; the NPU kernel takes one matmul, so it runs unfused, saying
   so): fused vs unfused decision, max relative error against a float64
   reference computed on the CPU from every rank's seeded inputs, and the
   time of the guarded op and of its unfused path.
   With 4+ NPUs, the same again on the groups vllm-ascend's fine-grained TP
   makes across DP ranks ([0, 2] and [1, 3] of 4: its mlp_tp / otp layout,
   HCCL communicators of 2 ranks spanning devices 0-3). Each rank's group is
   the only communicator its fused kernels use in that run. (Inside a model
   on Atlas A2, where torch_npu lets one communicator per model fuse, fcpass
   declines such groups beside vLLM's TP group, on every rank alike: tested
   off hardware with vllm-ascend's own groups.)
2. A small vllm-ascend model: ``vllm.LLM(tensor_parallel_size=2)`` on a random
   Llama checkpoint (written with transformers, no download), bf16, without
   and with fcpass (``PassConfig(sequence_parallel=True)``), npugraph_ex off
   in both (with it on no user pass runs): greedy tokens equal, prefill ms.

Without torch_npu or without 2 NPUs it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time

from devtools import kernel_check
from devtools.kernel_check import table, torch

WORLD_SIZE = 2


def missing() -> str | None:
    """What this machine lacks for the check, or None."""
    if torch is None:
        return f"torch is not installed in {sys.executable}"
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (this check runs on an Ascend machine with CANN and torch_npu)"
    import torch_npu  # noqa: F401

    npu = getattr(torch, "npu", None)  # what torch_npu adds to torch (a stand-in of it does not)
    if npu is None or not npu.is_available() or npu.device_count() < WORLD_SIZE:
        return f"fewer than {WORLD_SIZE} NPUs visible"
    return None


def import_torch_npu() -> None:
    """run_ranks' setup: torch_npu registers the HCCL backend before the process group exists."""
    import torch_npu  # noqa: F401


# vllm-ascend's fine-grained TP groups across DP ranks (DP=2 x group 2 on 4 ranks), as its parallel state makes them
FINE_GRAINED_GROUPS = [[0, 2], [1, 3]]


def kernels_rank(rank: int, world_size: int, tokens_list, device_type: str = "npu", threshold_tokens=None,
                 shape=(kernel_check.K, kernel_check.N), repeats: int = kernel_check.REPEATS, groups=None) -> list[dict]:
    """Part 1 in one rank (backend "hccl"), on the world or on ``groups``; ``device_type`` "cpu" runs the same
    cases through the generic backend on gloo (how this script is tested off hardware)."""
    backend = "npu" if device_type == "npu" else "generic"
    return kernel_check.kernels_rank(rank, world_size, tokens_list, device_type, backend, threshold_tokens, shape,
                                     repeats, groups=groups)


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
    print("fcpass NPU kernels, 2 ranks over HCCL (error: max relative vs float64; ms: median of",
          kernel_check.REPEATS, "calls)")
    print(table(kernel_check.merged(per_rank)))
    if torch.npu.device_count() >= 2 * WORLD_SIZE:
        per_rank = run_ranks(kernels_rank, 2 * WORLD_SIZE, tokens, "npu", None, (kernel_check.K, kernel_check.N),
                             kernel_check.REPEATS, FINE_GRAINED_GROUPS, backend="hccl", setup=import_torch_npu,
                             timeout=1800)
        print(f"\nthe same on vllm-ascend's fine-grained TP groups {FINE_GRAINED_GROUPS} of {2 * WORLD_SIZE} ranks")
        print(table(kernel_check.merged(per_rank)))
    if not args.skip_engine:
        with tempfile.TemporaryDirectory(prefix="fcpass-ascend-check-") as model_dir:
            engine.write_llama(model_dir, hidden=1024, layers=4, max_positions=2048)
            print("\nvllm-ascend, vllm.LLM(tensor_parallel_size=2), bf16, random Llama (hidden 1024, 4 layers)")
            print(table(engine_rows(model_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
