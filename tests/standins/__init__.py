"""Stand-ins for what cannot run here, derived from the real signatures: torch_npu (npu/torch_npu, names and
signatures only, and its emulation npu_kernels.py), vLLM's CPU shared-memory collectives where its kernels lack
them (shm.py)."""
