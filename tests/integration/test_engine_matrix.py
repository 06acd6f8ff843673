"""The real engine on the model families vLLM serves: ``vllm.LLM(tensor_parallel_size=2)`` with and without
fcpass's showcase config, on random checkpoints of each (fcpass/checks/checkpoints.py), vLLM's AVX2 kernel build
(its all_reduce over gloo, where the split pays; on the shm build nothing is split, test_vllm_engine covers
that), compile caches on.

The quick subset (in ``make test``): GPT-NeoX, LayerNorm with its bias and the parallel-residual layout.
The full matrix (``make engine-matrix``, ``FCPASS_ENGINE_MATRIX=full``): also Llama (RMSNorm, dense), OPT
(LayerNorm, biases, learned positions every rank looks up alike), OPT with post-norms (OPT-350m's layout),
Falcon (one LayerNorm for attention and MLP, their outputs summed before one all_reduce) and Qwen3-MoE
(RMSNorm, MoE MLP).

Expected per worker, from each architecture (2 layers, :class:`Layer`): every all_reduce split (the
embedding's and each layer's), the reduce_scatters of matmul outputs fused (a dense layer's two row-parallel
linears; an MoE layer's attention output only: its experts' sum is no matmul; Falcon's one scatter, after
the sum of its attention's and MLP's products, by the op over a sum of products), the all_gathers read by
matmuls fused; the embedding's scatter has no matmul
before it, the final norm's gather none after. Same greedy tokens as without fcpass.
"""

import os
from dataclasses import dataclass

import pytest

from devtools import engine
from devtools.engine import LAYERS, PROMPT_LENGTHS
from passes.report import FUSED, NO_MATMUL_CONSUMER, NO_MATMUL_PRODUCER, SPLIT
from support import vllm_kernels
from support.engine_expectations import FCPASS, THRESHOLD, sorted_rows

pytestmark = pytest.mark.e2e

ENGINE_TIMEOUT_S = 480
@dataclass(frozen=True)
class Layer:
    """One decoder layer as fcpass sees it: its all_reduces, the reduce_scatters fused (a matmul before them),
    what is before the others, and the gathers fused (matmuls read them)."""

    all_reduces: int = 2
    scatters_fused: int = 2
    sums_fused: int = 0  # scatters after a sum of two matmuls (Falcon), fused by the sum op
    gathers_fused: int = 2  # qkv, and the MLP's up (or the router) projection
    not_a_matmul: str = ""  # the form of a scatter with no matmul before it


LAYER_SHAPES = {
    "gpt_neox": Layer(), "llama": Layer(), "opt": Layer(), "opt_post_norm": Layer(),
    "qwen3_moe": Layer(scatters_fused=1, not_a_matmul="<built-in function getitem>"),  # the experts' sum
    # one norm read by attention and MLP (one gather into both), their outputs summed before one all_reduce
    "falcon": Layer(all_reduces=1, scatters_fused=0, sums_fused=1, gathers_fused=1),
}
QUICK = ("gpt_neox",)
ARCHITECTURES = tuple(LAYER_SHAPES) if os.environ.get("FCPASS_ENGINE_MATRIX") == "full" else QUICK


def expected_report(architecture: str) -> list[tuple]:
    layer = LAYER_SHAPES[architecture]
    others = (layer.all_reduces - layer.scatters_fused - layer.sums_fused) * LAYERS
    return sorted([("sequence_parallel", "c10d_functional", SPLIT)] * (1 + layer.all_reduces * LAYERS)
                  + [("mm_reduce_scatter", "c10d_functional/onednn_mm+pad", FUSED)] * (layer.scatters_fused * LAYERS)
                  + [("mm_reduce_scatter", "c10d_functional/sum(onednn_mm,onednn_mm)+pad", FUSED)]
                  * (layer.sums_fused * LAYERS)
                  + [("mm_reduce_scatter", "c10d_functional/aten.where.self+pad", NO_MATMUL_PRODUCER)]  # embedding
                  + [("mm_reduce_scatter", f"c10d_functional/{layer.not_a_matmul}+pad", NO_MATMUL_PRODUCER)] * others
                  + [("all_gather_mm", "c10d_functional/onednn_mm+unpad", FUSED)] * (layer.gathers_fused * LAYERS)
                  + [("all_gather_mm", "c10d_functional/-", NO_MATMUL_CONSUMER)])  # the final norm's


@pytest.fixture(scope="module", params=ARCHITECTURES)
def runs(request, tmp_path_factory):
    architecture = request.param
    folder = tmp_path_factory.mktemp(f"engine-{architecture}")
    env = {"VLLM_CACHE_ROOT": str(folder / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
           **vllm_kernels.avx2_env()}
    return architecture, engine.run_both(str(folder / "model"), FCPASS, PROMPT_LENGTHS, ENGINE_TIMEOUT_S, env,
                                         architecture)


def test_same_greedy_tokens_as_without_fcpass(runs):
    _, result = runs
    assert result["fcpass"]["ids"] == result["plain"]["ids"]


def test_every_all_reduce_is_split_and_the_matmuls_beside_them_fused(runs):
    architecture, result = runs
    assert result["fcpass"]["all_reduce"] == ["c10d_functional"] * 2
    for reports in result["fcpass"]["reports"]:  # per worker: its one graph's report
        assert [sorted_rows(rows) for rows in reports] == [expected_report(architecture)]


def test_prefills_above_the_threshold_take_the_fused_path(runs):
    architecture, result = runs
    layer = LAYER_SHAPES[architecture]
    for length, per_worker in zip(PROMPT_LENGTHS, result["fcpass"]["decisions"]):
        path = "fused" if length > THRESHOLD else "unfused"
        counts = {f"mm_reduce_scatter_onednn/{path}": layer.scatters_fused * LAYERS,
                  f"mm_sum_reduce_scatter_onednn/{path}": layer.sums_fused * LAYERS,
                  f"all_gather_onednn_mm/{path}": layer.gathers_fused * LAYERS}
        assert per_worker == [{op: n for op, n in counts.items() if n}] * 2, (length, per_worker)
