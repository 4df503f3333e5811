"""The machine a measurement ran on, in one line for model cards and tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_host() -> str:
    """The CPU's model name, its CPU count, and the torch version with its thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)"
