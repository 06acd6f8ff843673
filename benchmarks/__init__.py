"""The benchmarks: `python -m benchmarks.<name>` from the checkout (see benchmarks/README.md); not installed."""
