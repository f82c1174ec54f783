"""Run one benchmark case in a fresh Python process and collect its measurements; write JSON and Markdown.

Memory is measured per process so one method's allocations never inflate another's: on CUDA as the peak of
``torch.cuda.max_memory_allocated`` above the resting model, on CPU as the peak resident set size (sampled every
few milliseconds by a thread) above the resting model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


def run_case(module: str, case: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m <module> --case '<json>'`` and return the JSON object it prints last."""
    command = [sys.executable, "-m", module, "--case", json.dumps(case)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class PeakMemory:
    """Peak memory above the level when :meth:`track` starts, in bytes (CUDA allocator or process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @contextmanager
    def track(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield self
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base
            return
        import psutil

        process = psutil.Process()
        base = process.memory_info().rss
        highest = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                highest[0] = max(highest[0], process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            highest[0] = max(highest[0], process.memory_info().rss)
            self.peak = highest[0] - base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], table: str, output_dir: str | Path, name: str) -> Path:
    """Write ``<name>.json`` (rows + run metadata) and ``<name>.md`` (the table) to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(table + "\n")
    return output_dir / f"{name}.json"


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
