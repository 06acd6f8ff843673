"""The Ascend hardware check: what fcpass cannot verify without an NPU, in one run.

    python -m fcpass.checks.ascend [--skip-engine] [--tokens 512,4096] [--model MODEL]

(or ``fcpass-ascend-check``; ``make ascend-check`` in a checkout). Needs a machine with 2+ Ascend NPUs
(Atlas A2/A3), CANN, torch_npu and (for part 2) vllm-ascend installed. It prints one table per part to send
back.

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
2. vllm-ascend's engine without and with fcpass (``PassConfig(sequence_parallel=True)``), side by side
   (fcpass/compare.py): ``vllm.LLM(tensor_parallel_size=2)``, bf16, npugraph_ex off in both (with it on no
   user pass runs), on ``--model`` or a random Llama checkpoint (written with transformers, no download):
   greedy tokens equal, prefill and decode ms, what fcpass's ops did.
3. vllm-ascend's own linear ops in the same engine (``--skip-engine`` skips it too), fcpass's default config (no
   sequence parallelism of its own: vllm-ascend's ops make the sites), prefills of 64 and 1500 tokens (its
   FlashComm v1 is on above 1000): each switch of ``LINEAR_SWITCHES`` its release has the op for (0.23: FlashComm
   v1 at TP=2, FlashComm2 with o_proj TP 2 at TP=4) and the machine the NPUs for; each one it skips, it says why.
   The same switches as the linear-op table's rows (docs/REFERENCE.md, "vllm-ascend's linear ops"), tested off
   hardware on gloo ranks: on A3 fcpass fuses FlashComm v1's gather on vLLM's TP group and FlashComm2's
   matmul -> reduce_scatter on its otp group; on A2 it leaves the otp site alone (one communicator per model).

Without torch_npu or without 2 NPUs it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile

import torch

from fcpass.checks import kernels
from fcpass.checks.kernels import table

WORLD_SIZE = 2


def missing() -> str | None:
    """What this machine lacks for the check, or None."""
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
                 shape=(kernels.K, kernels.N), repeats: int = kernels.REPEATS, groups=None) -> list[dict]:
    """Part 1 in one rank (backend "hccl"), on the world or on ``groups``; ``device_type`` "cpu" runs the same
    cases through the generic backend on gloo (how this script is tested off hardware)."""
    backend = "npu" if device_type == "npu" else "generic"
    return kernels.kernels_rank(rank, world_size, tokens_list, device_type, backend, threshold_tokens, shape, repeats,
                                groups=groups)


ENGINE_ARGS = {"tensor_parallel_size": WORLD_SIZE, "dtype": "bfloat16",
               "additional_config": {"ascend_compilation_config": {"enable_npugraph_ex": False}}}
ENGINE_FCPASS = {"sequence_parallel": True}


# Part 3: (what it is, tensor_parallel_size, vllm-ascend's additional_config, the linear op its release needs)
LINEAR_SWITCHES = (
    ("FlashComm v1", 2, {"enable_flashcomm1": True}, "SequenceColumnParallelOp"),
    ("FlashComm2, o_proj TP 2, with FlashComm v1", 4,
     {"enable_flashcomm1": True, "enable_flashcomm2_parallel_size": 2}, "Flashcomm2OProjRowParallelOp"),
)


def engine_table(model: str, engine_args: dict = ENGINE_ARGS, pass_fields: dict = ENGINE_FCPASS) -> str:
    """Part 2 (and each of part 3's): the engine without and with fcpass, one after the other, side by side."""
    from fcpass import compare

    plan = compare.plan((64, 1500), batch=4, decode_steps=8, repeats=3, engine_args=engine_args)
    runs = compare.compare(model, pass_fields, plan)
    return compare.table(compare.summary(runs))


def linear_switches(linear_ops, npus: int) -> list[tuple[str, dict | str]]:
    """Part 3's runs: (what, the engine's arguments) for each switch this vllm-ascend (its ``vllm_ascend.ops.
    linear_op`` module) has the op for and this machine the NPUs for, else (what, why it is skipped)."""
    runs = []
    for what, tp, switches, op in LINEAR_SWITCHES:
        if not hasattr(linear_ops, op):
            runs.append((what, f"skipped: this vllm-ascend has no {op}"))
        elif npus < tp:
            runs.append((what, f"skipped: it needs {tp} NPUs, {npus} visible"))
        else:
            additional = {**ENGINE_ARGS["additional_config"], **switches}
            runs.append((what, {**ENGINE_ARGS, "tensor_parallel_size": tp, "additional_config": additional}))
    return runs


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found.add_argument("--tokens", default="512,4096", help="token counts (even): below and above the threshold")
    found.add_argument("--skip-engine", action="store_true", help="the kernels only")
    found.add_argument("--model", help="part 2's model (default: a random Llama, hidden 1024, 4 layers)")
    return found


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    problem = missing()
    if problem:
        print(f"ascend-check: nothing run: {problem}", file=sys.stderr)
        return 2
    from fcpass.local_ranks import run_ranks

    tokens = [int(t) for t in args.tokens.split(",")]
    per_rank = run_ranks(kernels_rank, WORLD_SIZE, tokens, backend="hccl", setup=import_torch_npu, timeout=1800)
    print("fcpass NPU kernels, 2 ranks over HCCL (error: max relative vs float64; ms: median of",
          kernels.REPEATS, "calls)")
    print(table(kernels.merged(per_rank)))
    if torch.npu.device_count() >= 2 * WORLD_SIZE:
        per_rank = run_ranks(kernels_rank, 2 * WORLD_SIZE, tokens, "npu", None, (kernels.K, kernels.N),
                             kernels.REPEATS, FINE_GRAINED_GROUPS, backend="hccl", setup=import_torch_npu,
                             timeout=1800)
        print(f"\nthe same on vllm-ascend's fine-grained TP groups {FINE_GRAINED_GROUPS} of {2 * WORLD_SIZE} ranks")
        print(table(kernels.merged(per_rank)))
    if not args.skip_engine:
        with tempfile.TemporaryDirectory(prefix="fcpass-ascend-check-") as model_dir:
            if args.model:
                model, named = args.model, f"model {args.model}"
            else:
                from fcpass.checks import checkpoints

                checkpoints.write(model_dir, "llama", hidden=1024, layers=4, max_positions=2048)
                model, named = model_dir, "random Llama (hidden 1024, 4 layers)"
            print(f"\nvllm-ascend, vllm.LLM(**{ENGINE_ARGS}), without and with fcpass {ENGINE_FCPASS}")
            print(f"{named}\n{engine_table(model)}")
            from vllm_ascend.ops import linear_op

            for what, run in linear_switches(linear_op, torch.npu.device_count()):
                print(f"\nvllm-ascend's {what}, without and with fcpass's default config")
                print(run if isinstance(run, str) else f"vllm.LLM(**{run}), {named}\n{engine_table(model, run, {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
