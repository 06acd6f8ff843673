"""The demos (`make demo`); not installed, run from the checkout: `python -m examples.demo`."""
