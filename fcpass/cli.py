"""What fcpass's measuring commands share outside the ranks (``python -m fcpass.calibrate``, the checkout's
benchmarks): CLI lists with clear errors, the result file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging() -> None:
    """Progress on stderr, so stdout keeps only the result table."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")


def int_list(text: str, what: str, multiple_of: int = 1, minimum: int = 1) -> tuple[int, ...]:
    """'256,512' -> (256, 512); an argparse error naming ``what`` otherwise."""
    values = []
    for item in text.split(","):
        try:
            value = int(item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {item.strip()!r} is not an integer (in {text!r})") from None
        if value < minimum or value % multiple_of:
            rule = f">= {minimum}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
            raise argparse.ArgumentTypeError(f"{what}: {value} must be {rule}")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{what}: {text!r} repeats a value")
    return tuple(sorted(values))


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """'1024x1024,512x2048' -> ((1024, 1024), (512, 2048)): (k, n) per shape."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            k, n = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes: {item.strip()!r} is not KxN (like 1024x1024)") from None
        if k < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"--shapes: {item.strip()!r} needs k, n >= 1")
        shapes.append((k, n))
    if len(set(shapes)) != len(shapes):
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} repeats a shape")
    return tuple(shapes)


def dtype_arg(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"--dtype: {text!r} is not one of {sorted(DTYPES)}")
    return DTYPES[text]


def machine(backend: str = "gloo") -> dict:
    """What a result was measured on: the machine, torch, and the process group's backend."""
    return {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "backend": backend, "threads_per_rank": 1}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
