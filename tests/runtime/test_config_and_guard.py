"""PassConfig validation and the guard predicate (pure: no process group)."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import fcpass
from fcpass import guard
from fcpass.backends.npu import NpuBackend
from fcpass.guard import GuardFacts, KernelLimits, decide


def test_config_round_trips():
    config = fcpass.PassConfig(fuse_all_gather_mm=False, threshold_tokens=4096, max_world_size=16,
                               backend="generic", pipeline_chunks=3)
    assert fcpass.PassConfig.from_dict(config.to_dict()) == config
    assert fcpass.PassConfig.from_dict({}) == fcpass.PassConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold_tokens = 1


@pytest.mark.parametrize(
    "values, key",
    [
        ({"threshold": 5}, "threshold"),
        ({"threshold_tokens": -1}, "threshold_tokens"),
        ({"threshold_tokens": "1000"}, "threshold_tokens"),
        ({"max_world_size": 1}, "max_world_size"),
        ({"backend": "tpu"}, "backend"),
        ({"pipeline_chunks": 65}, "pipeline_chunks"),
        ({"fuse_mm_reduce_scatter": 1}, "fuse_mm_reduce_scatter"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        fcpass.PassConfig.from_dict(values)


def _facts(**overrides):
    values = dict(op="mm_reduce_scatter", num_tokens=2048, world_size=2, dtype=torch.bfloat16,
                  k=4096, n=4096, device_type="npu")
    values.update(overrides)
    return GuardFacts(**values)


NPU_LIMITS = NpuBackend._limits


@pytest.mark.parametrize(
    "facts, fused, reason",
    [
        (_facts(num_tokens=1000), False, "tokens <= threshold"),
        (_facts(num_tokens=1002), True, "tokens > threshold"),
        (_facts(world_size=16), False, "world_size 16 > max_world_size 8"),
        (_facts(world_size=6), False, "world_size 6 not in kernel's [2, 4, 8]"),
        (_facts(k=255), False, "k 255 < kernel minimum 256"),
        (_facts(k=65530), False, "k 65530 >= kernel limit"),
        (_facts(dtype=torch.float32), False, "dtype torch.float32 not supported"),
        (_facts(num_tokens=1003), False, "tokens 1003 not divisible by world_size 2"),
    ],
)
def test_npu_guard(facts, fused, reason):
    decision = decide(facts, 1000, NPU_LIMITS, max_world_size=8)
    assert decision.fused == fused and reason in decision.reason


def test_guard_backend_off_and_counts():
    fcpass.reset_decision_counts()
    for facts in (_facts(), _facts(), _facts(num_tokens=10)):
        guard.record(facts, decide(facts, 1000, KernelLimits(), 8))
    guard.record(_facts(), decide(_facts(), 1000, None, 8))
    assert fcpass.decision_counts() == {
        ("mm_reduce_scatter", "fused", "tokens > threshold"): 2,
        ("mm_reduce_scatter", "unfused", "tokens <= threshold"): 1,
        ("mm_reduce_scatter", "unfused", "backend off"): 1,
    }


BLOCK_IMPORTS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('vllm', 'torch_npu'):
            raise ModuleNotFoundError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import torch, fcpass
assert 'vllm' not in sys.modules and 'torch_npu' not in sys.modules
print([op for op in sys.argv[1:] if hasattr(torch.ops.fcpass, op)])
"""
FUSED_OPS = ("all_gather_mm", "all_gather_scaled_mm", "mm_reduce_scatter", "mm_reduce_scatter_scaled",
             "all_gather_onednn_mm", "mm_reduce_scatter_onednn", "drop_token_padding")


def test_import_without_vllm_or_torch_npu():
    out = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS, *FUSED_OPS], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(list(FUSED_OPS))
