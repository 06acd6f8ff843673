"""What FlashCommPass does to the CPU engine's graph of devtools.engine's tiny Llama, per worker (both tests of it),
under the showcase config (the demo's ``--config showcase``) and under the defaults (``PassConfig()``).

The engine's one whole-model graph has 2 * LAYERS + 1 all_reduces (embedding, o_proj and down_proj of each
layer), each before an RMSNorm. Their form is the kernel library's (tests/support/vllm_kernels.py): "shm" on
AVX-512 builds, else "c10d_functional". vLLM's shm all_reduce is faster than the split's collectives over gloo,
so there nothing is split and nothing fused (matmul -> all_reduce declines it for the same reason). Over
gloo every all_reduce is split by sequence parallelism; then per layer 2 onednn_mm->reduce_scatter and 2
all_gather->onednn_mm fuse (the embedding's scatter has no matmul before it, the final norm's gather none after).
The defaults leave the graph as it was: nothing split, and matmul -> all_reduce leaves every all_reduce alone,
shm for its transport, gloo because on CPU tensors its fused path is never taken by default
(benchmarks/README.md).
"""

from examples.demo import fcpass_fields
from devtools.engine import LAYERS
from passes.report import (FAMILY_DISABLED, FASTER_TRANSPORT, FUSED, NEVER_FUSED, NO_MATMUL_CONSUMER,
                           NO_MATMUL_PRODUCER, SP_TRANSPORT, SPLIT, outcome_kind)

THRESHOLD = 16
FCPASS = fcpass_fields(THRESHOLD)
DEFAULTS: dict = {}  # PassConfig(): what the README tells users to start from


def worker_report(all_reduce_form: str, fields: dict = FCPASS) -> list[tuple]:
    if fields == DEFAULTS:
        left_alone = FASTER_TRANSPORT if all_reduce_form == "shm" else NEVER_FUSED
        return sorted([("sequence_parallel", all_reduce_form, FAMILY_DISABLED)] * (2 * LAYERS + 1)
                      + [("mm_all_reduce", f"{all_reduce_form}/onednn_mm", left_alone)] * (2 * LAYERS)
                      + [("mm_all_reduce", f"{all_reduce_form}/aten.where.self", left_alone)])
    if all_reduce_form == "shm":
        return sorted([("sequence_parallel", "shm", SP_TRANSPORT)] * (2 * LAYERS + 1)
                      + [("mm_all_reduce", "shm/onednn_mm", FASTER_TRANSPORT)] * (2 * LAYERS)
                      + [("mm_all_reduce", "shm/aten.where.self", FASTER_TRANSPORT)])
    return sorted(
        [("sequence_parallel", all_reduce_form, SPLIT)] * (2 * LAYERS + 1)
        + [("mm_reduce_scatter", "c10d_functional/onednn_mm+pad", FUSED)] * (2 * LAYERS)
        + [("mm_reduce_scatter", "c10d_functional/aten.where.self+pad", NO_MATMUL_PRODUCER)]
        + [("all_gather_mm", "c10d_functional/onednn_mm+unpad", FUSED)] * (2 * LAYERS)
        + [("all_gather_mm", "c10d_functional/-", NO_MATMUL_CONSUMER)])


def fused_ops_per_prefill(all_reduce_form: str, path: str, fields: dict = FCPASS) -> dict[str, int]:
    """A worker's fused-op decisions in one prefill (``path``: "fused" or "unfused"): none where nothing fused."""
    if all_reduce_form == "shm" or fields == DEFAULTS:
        return {}
    return {f"mm_reduce_scatter_onednn/{path}": 2 * LAYERS, f"all_gather_onednn_mm/{path}": 2 * LAYERS}


def sorted_rows(rows) -> list[tuple]:
    """A worker's report rows as (family, form, outcome constant), sorted: the constants, not the details."""
    return sorted((family, form, outcome_kind(outcome)) for family, form, outcome in rows)
