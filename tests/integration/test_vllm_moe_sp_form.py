"""The model-level sequence parallelism vLLM's MoE models emit themselves, matched by the fusion families.

DeepSeek-V2/V3 (``use_sequence_parallel_moe``) and Qwen3-Next/Qwen3.5
(``use_attn_reduce_scatter_for_moe``) keep the residual stream sharded by
token around the MoE: the attention's o_proj runs without its all_reduce,
its output is padded to a multiple of the TP size and reduce-scattered
(``F.pad(x, (0, 0, 0, (-n) % tp))`` then
``tensor_model_parallel_reduce_scatter(x, 0)``), the norms run on the
shard, and before the next qkv_proj the shard is gathered and the padding
dropped (``tensor_model_parallel_all_gather(h, 0)[:num_tokens]``). The
layer below is that stream with vLLM's own collective functions on vLLM's
TP group (TP=2, gloo); the MoE, which runs on the shard with its own
expert communication, is left out. Expected: the o_proj site fuses with its
pad (``vllm/mm+pad``), the qkv site with its unpad slice (``vllm/mm+unpad``),
outputs equal the eager layer at odd and even token counts.
"""

import pytest
import torch

from support.multirank import shared
from devtools.vllm_cpu import rank_setup, vllm_tp

HIDDEN, QKV = 64, 96
THRESHOLD = 16
TOKENS = (7, 8, 33)


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class MoeStyleSPLayer(torch.nn.Module):
    """Input norm on the shard -> gather + unpad -> qkv_proj -> o_proj -> pad + reduce_scatter -> norm on the shard."""

    def __init__(self, rank, world_size):
        super().__init__()
        shared, own = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + rank)
        self.world_size = world_size
        self.w_qkv = torch.nn.Parameter(torch.randn(HIDDEN, QKV // world_size, generator=own) / HIDDEN ** 0.5)
        self.w_o = torch.nn.Parameter(torch.randn(QKV // world_size, HIDDEN, generator=own) / QKV ** 0.5)
        self.input_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=shared))
        self.post_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=shared))

    def forward(self, hidden_shard, positions):
        from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_reduce_scatter

        num_tokens = positions.shape[0]
        residual = hidden_shard
        h = tensor_model_parallel_all_gather(rms_norm(hidden_shard, self.input_norm), 0)[:num_tokens]
        attn = torch.tanh(h @ self.w_qkv)  # stands for rotary + attention on this rank's heads
        out = attn @ self.w_o  # o_proj with reduce_results=False
        out = torch.nn.functional.pad(out, (0, 0, 0, (-out.shape[0]) % self.world_size))
        out = tensor_model_parallel_reduce_scatter(out, 0)
        return rms_norm(out + residual, self.post_norm)


def run_layer(rank, world_size):
    import torch._inductor.config as inductor_config

    import fcpass
    from passes import FlashCommPass

    results = {"errors": [], "decisions": []}
    with vllm_tp(rank, world_size) as (_, tp_group), torch.no_grad():
        torch._dynamo.reset()
        layer = MoeStyleSPLayer(rank, world_size)
        flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLD))
        with inductor_config.patch({"post_grad_custom_post_pass": flashcomm, "fx_graph_cache": False}):
            compiled = torch.compile(layer, fullgraph=True)
            for n in TOKENS:
                shard_rows = -(-n // world_size)
                full = torch.randn(shard_rows * world_size, HIDDEN, generator=torch.Generator().manual_seed(n))
                shard = full[rank * shard_rows:(rank + 1) * shard_rows].contiguous()
                positions = torch.arange(n)
                torch._dynamo.mark_dynamic(shard, 0)
                torch._dynamo.mark_dynamic(positions, 0)
                want = layer(shard, positions)
                fcpass.reset_decision_counts()
                got = compiled(shard, positions)
                results["decisions"].append(fcpass.decision_counts())
                results["errors"].append(((got - want).abs().max() / want.abs().max()).item())
        results["outcomes"] = sorted((o.family, o.form, o.kind) for o in flashcomm.last_report.outcomes)
        results["group"] = tp_group.unique_name
    return results


LAYER_RUNS = shared(run_layer, setup=rank_setup, timeout=240)


@pytest.fixture(scope="module")
def layer_runs():
    return LAYER_RUNS()


def test_pad_reduce_scatter_and_gather_unpad_fuse(layer_runs):
    for r in layer_runs:
        assert r["outcomes"] == [("all_gather_mm", "vllm/mm+unpad", "fused"),
                                 ("mm_reduce_scatter", "vllm/mm+pad", "fused")]
        assert max(r["errors"]) <= 1e-5, r["errors"]
        for n, decisions in zip(TOKENS, r["decisions"]):
            path = "fused" if n > THRESHOLD else "unfused"
            assert {(op, p): c for (op, p, _), c in decisions.items()} == {
                ("all_gather_mm", path): 1, ("mm_reduce_scatter", path): 1}, n
