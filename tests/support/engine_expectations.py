"""What FlashCommPass does to the CPU engine's graph of devtools.engine's tiny Llama, per worker (both tests of it).

The engine's one whole-model graph has 2 * LAYERS + 1 all_reduces (embedding, o_proj and down_proj of each
layer), each before an RMSNorm: all split by sequence parallelism; then per layer 2 onednn_mm->reduce_scatter and
2 all_gather->onednn_mm fuse (the embedding's scatter has no matmul before it, the final norm's gather none after).
The all_reduces' form is the kernel library's (tests/support/vllm_kernels.py): "shm" on AVX-512 builds, else
"c10d_functional"; the split emits functional collectives either way.
"""

from examples.demo import fcpass_fields
from devtools.engine import LAYERS
from passes.report import FUSED, NO_MATMUL_CONSUMER, NO_MATMUL_PRODUCER, SPLIT

THRESHOLD = 16
FCPASS = fcpass_fields(THRESHOLD)


def worker_report(all_reduce_form: str) -> list[tuple]:
    return sorted(
        [("sequence_parallel", all_reduce_form, SPLIT)] * (2 * LAYERS + 1)
        + [("mm_reduce_scatter", "c10d_functional/onednn_mm+pad", FUSED)] * (2 * LAYERS)
        + [("mm_reduce_scatter", "c10d_functional/aten.where.self+pad", NO_MATMUL_PRODUCER)]
        + [("all_gather_mm", "c10d_functional/onednn_mm+unpad", FUSED)] * (2 * LAYERS)
        + [("all_gather_mm", "c10d_functional/-", NO_MATMUL_CONSUMER)])


def sorted_rows(rows) -> list[tuple]:
    return sorted(tuple(row) for row in rows)
