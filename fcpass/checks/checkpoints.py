"""Random checkpoints of the model families vLLM serves, written with transformers (no download).

Each family at the tiny Llama's proportions (hidden 256, heads of 64, intermediate 2 x hidden, vocab 1024,
fp32); initializer range 0.2 keeps greedy ids off near-ties. The families differ where fcpass's rewrite
looks: the norm (RMSNorm or LayerNorm with its bias), the residual layout (sequential, or parallel: attention
and MLP read the layer's input, their outputs summed with it) and the MLP (dense or MoE).
"""

from __future__ import annotations

import os

HIDDEN, HEADS, LAYERS, VOCAB = 256, 4, 2, 1024
INIT = 0.2


def _llama(hidden, layers, max_positions):
    from transformers import LlamaConfig

    heads = hidden // (HIDDEN // HEADS)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), num_hidden_layers=layers,
                       max_position_embeddings=max_positions, initializer_range=INIT)


def _gpt_neox(hidden, layers, max_positions):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=hidden // (HIDDEN // HEADS), num_hidden_layers=layers,
                         use_parallel_residual=True, rotary_pct=0.25, max_position_embeddings=max_positions,
                         initializer_range=INIT, tie_word_embeddings=False)


def _falcon(hidden, layers, max_positions):
    """Falcon-7B's layout: attention and MLP read one LayerNorm of the layer's input, and their outputs are
    summed before one all_reduce."""
    from transformers import FalconConfig

    return FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=hidden // (HIDDEN // HEADS),
                        num_hidden_layers=layers, parallel_attn=True, new_decoder_architecture=False,
                        multi_query=False, bias=False, alibi=False, max_position_embeddings=max_positions,
                        initializer_range=INIT, tie_word_embeddings=False)


def _opt(hidden, layers, max_positions, pre_norm=True):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=2 * hidden, word_embed_proj_dim=hidden,
                     num_attention_heads=hidden // (HIDDEN // HEADS), num_hidden_layers=layers,
                     max_position_embeddings=max_positions, do_layer_norm_before=pre_norm, init_std=INIT)


def _opt_post_norm(hidden, layers, max_positions):
    """OPT-350m's layout: each norm after its residual add (post-norm), none before the first layer."""
    return _opt(hidden, layers, max_positions, pre_norm=False)


def _qwen3_moe(hidden, layers, max_positions):
    from transformers import Qwen3MoeConfig

    heads = hidden // (HIDDEN // HEADS)
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                          moe_intermediate_size=hidden // 2, num_experts=4, num_experts_per_tok=2,
                          decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=heads,
                          num_key_value_heads=max(1, heads // 2), head_dim=HIDDEN // HEADS, num_hidden_layers=layers,
                          max_position_embeddings=max_positions, initializer_range=INIT)


# name -> transformers config of that family: RMSNorm dense, LayerNorm + parallel residual, LayerNorm dense
# (biases everywhere) pre- and post-norm, RMSNorm MoE; Falcon: one norm and one all_reduce for attention + MLP
ARCHITECTURES = {"llama": _llama, "gpt_neox": _gpt_neox, "falcon": _falcon, "opt": _opt,
                 "opt_post_norm": _opt_post_norm, "qwen3_moe": _qwen3_moe}


def write(path: str, architecture: str = "llama", hidden: int = HIDDEN, layers: int = LAYERS,
          max_positions: int = 1024, seed: int = 0) -> str:
    """A random fp32 checkpoint of ``architecture`` (safetensors) at ``path``, unless one is there."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {sorted(ARCHITECTURES)}")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        config = ARCHITECTURES[architecture](hidden, layers, max_positions)
        config.torch_dtype = "float32"
        AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path
