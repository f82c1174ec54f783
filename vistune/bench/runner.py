"""Run one benchmark case in a fresh Python process and collect its measurements; write JSON and Markdown.

Memory is measured per process so one method's allocations never inflate another's: on CUDA as the peak of
``torch.cuda.max_memory_allocated`` above the resting model, on CPU as the peak resident set size (sampled every
few milliseconds by a thread) above the resting model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.serialization import atomic_write


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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (every method alike), plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def frozen_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen backbone is stored in, matching :func:`autocast_for`: bf16 on CUDA (as the training
    scripts under ``--mixed_precision bf16``), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_training(
    setup: Callable[[], tuple[list[torch.nn.Parameter], Callable[[], torch.Tensor]]],
    device: torch.device,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """Peak memory and median optimizer-step time (forward + backward + AdamW step) of one method.

    ``setup()`` runs inside the memory tracking (so what it allocates counts) and returns the parameters to
    optimise and a function computing the loss of one batch (run under :func:`autocast_for`).
    """
    times: list[float] = []
    memory = PeakMemory(device)
    with memory.track():
        params, loss_fn = setup()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        for step in range(warmup + steps):
            synchronize(device)
            started = time.perf_counter()
            with autocast_for(device):
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - started)
    return {"device": str(device), "trainable_params": sum(p.numel() for p in params),
            "peak_memory_mb": memory.peak / 2**20, "step_seconds": statistics.median(times)}


def suite_main(
    argv: Sequence[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_case_here: Callable[[dict[str, Any]], dict[str, Any]] | None,
    run_from_args: Callable[[argparse.Namespace], Any],
) -> int:
    """The command line of a suite module: the whole suite, or (``--case JSON``, used by :func:`run_case`, for
    suites that measure cases in subprocesses) one case measured in this process, its result printed as JSON."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if run_case_here is not None:
        parser.add_argument("--case", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if getattr(args, "case", None):
        print(json.dumps(run_case_here(json.loads(args.case))))
    else:
        run_from_args(args)
    return 0


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], table: str, output_dir: str | Path, name: str) -> Path:
    """Write ``<name>.json`` (rows + run metadata) and ``<name>.md`` (the table) to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, text in ((output_dir / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2)),
                       (output_dir / f"{name}.md", table)):
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text + "\n"))  # never half a table
    return output_dir / f"{name}.json"


def sweep(
    module: str,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    base_case: dict[str, Any],
    meta: dict[str, Any],
    ratios: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str],
    output_dir: str | Path,
    name: str,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Measure every (method, batch size) of a suite in a fresh subprocess, add the suite's ratios, write
    ``<name>.json`` / ``<name>.md`` and log the table; returns the rows."""
    rows = []
    for batch in batch_sizes:
        for method in methods:
            log(f"measuring {method} at batch {batch} ...")
            rows.append(run_case(module, {**base_case, "method": method, "batch_size": batch}))
    rows = ratios(rows)
    table = markdown(rows, meta)
    write_results(rows, meta, table, output_dir, name)
    log(table)
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
