"""Stand-ins for what cannot run here, derived from the real signatures: torch_npu's kernels (npu/), vllm-ascend's
ops (ascend/), vLLM's CPU shared-memory collectives where its kernels lack them (shm.py)."""
