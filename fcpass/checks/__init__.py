"""The hardware checks: what fcpass cannot verify off the hardware, run by a user on theirs, one table to send back.

- ``python -m fcpass.checks.ascend`` (``fcpass-ascend-check``): the NPU kernels over HCCL, and vllm-ascend's
  engine without and with fcpass;
- ``python -m fcpass.checks.gpu`` (``fcpass-gpu-check``): the CUDA backend, CUDA-graph capture, NCCL, and vLLM's
  CUDA communicator under the unfused path.

Both share their cases, float64 references and table (kernels.py); off hardware they run the same cases on
CPU gloo ranks through the generic backend, which is how the suite tests them.
"""
