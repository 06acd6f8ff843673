"""The harness's models: vLLM's own ``LlamaModel`` class at this rank's TP shard, random weights (kinds below)."""

from __future__ import annotations

from unittest import mock

import torch

from devtools.vllm_cpu.attention import CausalAttention

MODEL_KINDS = ("llama", "llama_bias", "llama_3d", "llama_8_heads")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 1024
RMS_NORM_EPS = 1e-5  # SequenceParallelismPass registers its patterns for 1e-5 and 1e-6
DEFAULT_TOKEN_COUNTS = (7, 8, 64, 2048)


class _ModelConfigStandIn:
    def __init__(self, hf_config):
        self.hf_config = hf_config


class _ModelVllmConfig:
    """The VllmConfig as the model constructor sees it: the real one, plus ``model_config.hf_config``.

    vLLM's Llama classes read ``vllm_config.model_config.hf_config``; a real
    ModelConfig needs a checkpoint directory and would also switch on
    config-driven behaviour (compile ranges, SP thresholds) the harness does
    not want. Everything else (quant_config=None, cache_config,
    compilation_config, ...) comes from the real config.
    """

    def __init__(self, base, hf_config):
        self._base, self.model_config = base, _ModelConfigStandIn(hf_config)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _test_llama_model_class():
    from vllm.compilation.decorators import ignore_torch_compile
    from vllm.model_executor.models.llama import LlamaModel

    @ignore_torch_compile
    class TestLlamaModel(LlamaModel):
        """vLLM's LlamaModel, not compiled by vLLM's @support_torch_compile wrapper (the harness compiles it)."""

    return TestLlamaModel


class _Runner(torch.nn.Module):
    """Calls the model as vLLM's model runner does: ``model(input_ids, positions, intermediate_tensors=None)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions, None)


def _linear_3d(x, weight, bias=None):
    """The linear kernel of the "llama_3d" variant: the matmul sees [1, s, k] input."""
    return torch.nn.functional.linear(x.unsqueeze(0), weight, bias).squeeze(0)


def build_model(kind, vllm_config, seed=0, layers=LAYERS):
    """The model of ``kind`` on this rank with ``layers`` decoder layers, random weights from ``seed`` (call inside
    vLLM's TP context)."""
    from transformers import LlamaConfig
    from vllm.model_executor.layers.linear import LinearBase
    import vllm.model_executor.models.llama as llama

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {MODEL_KINDS}")
    bias = kind == "llama_bias"
    heads, kv_heads = (8, 8) if kind == "llama_8_heads" else (HEADS, KV_HEADS)  # TP=8 splits 8 heads
    hf_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=layers, rms_norm_eps=RMS_NORM_EPS,
        max_position_embeddings=4096, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    with mock.patch.object(llama, "Attention", CausalAttention):
        model = _test_llama_model_class()(vllm_config=_ModelVllmConfig(vllm_config, hf_config), prefix="model")
    # VLLM_CPU.md step 6: the same generator on every rank, parameters in the same order and shapes
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # linear weights and biases
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    # VLLM_CPU.md step 7: vLLM picks its CPU linear kernel when weights load; use F.linear
    linear = _linear_3d if kind == "llama_3d" else torch.nn.functional.linear
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.cpu_linear = linear
    return _Runner(model).eval()
