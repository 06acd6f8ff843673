"""Stand-in for vLLM's ``Attention`` in the harness's Llama: no KV cache, no forward context.

A test-only custom op (``fcpass_demo::causal_sdpa``, with a fake impl), so the
compiled graph holds one opaque node per layer where vLLM's attention would be.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fcpass_demo::causal_sdpa", mutates_args=())
def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> torch.Tensor:
    """Causal SDPA over one rank's heads; q [..., tokens, heads*d], k/v [..., tokens, kv_heads*d]."""
    shape = q.shape
    q, k, v = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])
    tokens, group = q.shape[0], num_heads // num_kv_heads
    qh = q.view(tokens, num_heads, head_dim).transpose(0, 1)
    kh = k.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    vh = v.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return out.transpose(0, 1).reshape(shape)


@causal_sdpa.register_fake
def _(q, k, v, num_heads, num_kv_heads, head_dim):
    return q.new_empty(q.shape)


class CausalAttention(torch.nn.Module):
    """Stands in for vLLM's ``Attention`` (same constructor): no KV cache, no forward context."""

    def __init__(self, num_heads, head_dim, scaling, num_kv_heads=None, **_):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads

    def forward(self, q, k, v):
        return torch.ops.fcpass_demo.causal_sdpa(q, k, v, self.num_heads, self.num_kv_heads,
                                                          self.head_dim)
