"""The benchmarks' results folder; their CLI helpers are fcpass.cli's, which the installed ``python -m
fcpass.calibrate`` shares."""

import os

from fcpass.cli import DTYPES, dtype_arg, int_list, machine, setup_logging, shape_list, write_json

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

__all__ = ["DTYPES", "RESULTS_DIR", "dtype_arg", "int_list", "machine", "setup_logging", "shape_list", "write_json"]
