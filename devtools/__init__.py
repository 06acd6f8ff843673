"""Not installed: the ranks launcher, the vLLM CPU harness and the engine runner (tests, benchmarks, examples)."""
