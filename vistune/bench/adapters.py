"""The adapter family side by side on VTAB-1k-style shapes-world tasks, with the shipped tiny ViT frozen.

    python -m vistune.bench.adapters                 # or: vistune bench adapters / python scripts/bench_adapters.py
    python -m vistune.bench.adapters --steps 50      # one epoch instead of 32: a quick look (about 30 min on CPU)
    python -m vistune.bench.adapters --quick         # a small smoke run (tests)
    python -m vistune.bench.adapters --imagefolder my_task/   # a user's ImageFolder task(s), same protocol
    python -m vistune.bench.adapters --tasks shape count --name part1   # split a run across processes ...
    python -m vistune.bench.adapters --merge part1.json part2.json      # ... and merge the parts into one table
    python -m vistune.bench.adapters --methods pear --pear-ratios 0.75 --name later   # a method or ratio added
                                                                        # later merges the same way
    python -m vistune.bench.adapters --cost          # training cost at ViT-B/16 224 (random weights)

Accuracy mode: for every task and seed, each method starts from the same backbone with a zero-initialised
head and trains for the same number of steps on the same batches (VTAB's final protocol: train + val, then
the held-out test set), AdamW with linear warm-up and cosine decay, on CUDA when present (else one CPU thread).
The default 2,000 steps x batch 16 are 32 epochs of the 1,000 train + val images (VTAB-1k recipes train 100): the
regime the sparse and pruned methods are made for. One epoch (``--steps 50``) under-trains every tuner and ranks
them differently (README).

* ``linear``: only the head, on frozen features cached once per task (the same maths as running the model);
* ``full``: every weight; ``lora``: peft LoRA on every block's qkv/proj/fc1/fc2 (``vistune.vit_baselines``);
* ``adapter``: AdaptFormer adapters; ``mosa``: MoSA experts of the same adapter (released VTAB recipe: Down
  shared, Up split; ``--mosa-experts``, 2 by default here, optional symmetric-KL consistency loss), merged into a
  plain adapter after training;
* ``pear``: the adapter run, scored for importance over its first ``pear_warmup`` steps, pruned and shared at
  each ratio at that point, and trained on for the remaining steps with the same batches.

Columns: mean test accuracy per task and overall (mean over seeds), trainable parameters, stored bytes (every
safetensors file the task needs: tuner / LoRA / full weights plus the head), median training step time and
inference time per image. Cost mode runs each method in a fresh subprocess (``vistune.bench.runner``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .runner import environment, measure_training, run_case, suite_main, write_results

METHODS = ("linear", "full", "lora", "adapter", "mosa", "pear", "mosa_hier")
DEFAULT_METHODS = METHODS[:6]  # mosa_hier (expert counts rising with depth, see hier_min_experts) on request
# interleaved by kind, so the partial table of an interrupted run already covers all three kinds
DEFAULT_TASKS = ("shape", "style", "count", "color", "small_shape", "orientation", "position", "size")  # all 8
#: learning rates per method (AdamW, weight decay 0.01 as MoSA's VTAB recipe); LoRA at 3e-3 or 1e-2 collapses to
#: chance on some tasks over 2,000 steps (seed-0 probe on the val split), 1e-3 does not
DEFAULT_LRS = {"linear": 1e-2, "full": 5e-4, "lora": 1e-3, "adapter": 1e-2, "mosa": 1e-2, "pear": 1e-2,
               "mosa_hier": 1e-2}
#: measured on these tasks at the default schedule: 2 experts beat 4 (README, benchmarks/results)
DEFAULT_MOSA_EXPERTS = 2
DEFAULT_STEPS = 2000
SPLIT_SETTINGS = ("methods", "pear_ratios", "lrs")  # may differ between runs merged into one table (lrs: per method)
LR_KEYS = {"pear": ("adapter", "pear")}  # learning rates a method's rows depend on (Pear: the adapter's warm-up too)
COST_METHODS = ("full", "adapter", "mosa", "mosa_kl", "pear")
Log = Callable[[str], None]


# --------------------------------------------------------------------------- shared pieces


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return lr * (step + 1) / ramp
    return lr * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def batch_schedule(num_items: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: reshuffled epochs from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(num_items, generator=generator).tolist()
    return [torch.tensor(order[i * batch : (i + 1) * batch]) for i in range(steps)]


def normalize(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    return (x - mean) / std


def new_head(model: nn.Module, num_classes: int) -> None:
    """A zero-initialised task head (every method starts from the same function)."""
    model.reset_classifier(num_classes)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)


def safetensors_bytes(tensors: dict[str, torch.Tensor], directory: Path, name: str) -> int:
    from safetensors.torch import save_file

    path = directory / name
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """(accuracy, seconds per image) of ``model`` in eval mode on normalised images ``x``."""
    model.eval()
    correct, started = 0, time.perf_counter()
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
    return correct / len(y), (time.perf_counter() - started) / len(y)


class Trainer:
    """Runs steps ``[start, stop)`` of one schedule on ``model`` and times them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor], lr: float,
                 *, kl_weight: float = 0.0, on_backward: Callable[[int], None] | None = None):
        self.model, self.x, self.y, self.batches, self.lr = model, x, y, batches, lr
        self.kl_weight, self.on_backward = kl_weight, on_backward
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.times: list[float] = []

    def run(self, start: int, stop: int) -> None:
        from ..tuners.mosa import mosa_consistency_loss

        self.model.train()
        for step in range(start, stop):
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, len(self.batches), self.lr)
            idx = self.batches[step].to(self.x.device)
            x, y = self.x[idx], self.y[idx]
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            if self.kl_weight:
                loss = loss + self.kl_weight * mosa_consistency_loss(logits, self.model(x))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.on_backward is not None:
                self.on_backward(step)
            self.optimizer.step()
            if self.x.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - started)
        self.model.eval()

    def step_seconds(self) -> float:
        timed = self.times[2:] or self.times
        return statistics.median(timed) if timed else float("nan")


# --------------------------------------------------------------------------- accuracy mode


def _row(task, method: str, seed: int, accuracy: float, params: int, stored: int, step_s: float, infer_s: float,
         **extra) -> dict[str, Any]:
    return {"task": task.name, "kind": task.kind, "method": method, "seed": seed, "accuracy": accuracy,
            "trainable_params": params, "stored_bytes": stored, "step_seconds": step_s,
            "inference_ms_per_image": 1000 * infer_s, **extra}


def _count(params) -> int:
    return sum(p.numel() for p in params)


def run_task_seed(base: nn.Module, task, seed: int, settings: dict[str, Any], cache: dict[str, Any],
                  log: Log) -> list[dict[str, Any]]:
    """Every method on one task and seed; returns one row per method (Pear: one per ratio)."""
    with tempfile.TemporaryDirectory(prefix="vistune-bench-") as tmp:
        return _run_methods(base, task, seed, settings, cache, log, Path(tmp))


def _run_methods(base: nn.Module, task, seed: int, settings: dict[str, Any], cache: dict[str, Any], log: Log,
                 tmp: Path) -> list[dict[str, Any]]:
    import vistune
    from ..tuners.mosa import merge_mosa
    from ..tuners.pear import accumulate_importance, prune_and_share
    from ..vit_baselines import prepare_vit_baseline

    methods, steps, batch, lrs = settings["methods"], settings["steps"], settings["batch_size"], settings["lrs"]
    train_x, train_y = cache["train_x"], cache["train_y"]
    test_x, test_y = cache["test_x"], cache["test_y"]
    batches = batch_schedule(len(train_y), steps, batch, seed)
    adapter_config = dict(bottleneck=settings["bottleneck"])
    rows: list[dict[str, Any]] = []

    def fresh() -> nn.Module:
        model = copy.deepcopy(base)
        new_head(model, task.num_classes)
        return model

    def stored_tuner(model: nn.Module, label: str) -> int:
        folder = tmp / label
        vistune.save_tuners(model, folder)
        return (folder / vistune.WEIGHTS_NAME).stat().st_size + safetensors_bytes(head_state(model), folder, "head.safetensors")

    if "linear" in methods:
        torch.manual_seed(seed)
        head = nn.Linear(cache["features_train"].shape[1], task.num_classes).to(train_y.device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        trainer = Trainer(head, cache["features_train"], train_y, batches, lrs["linear"])
        trainer.run(0, steps)
        accuracy, _ = evaluate(head, cache["features_test"], test_y)
        stored = safetensors_bytes({f"head.{k}": v for k, v in head.state_dict().items()}, tmp, "linear.safetensors")
        rows.append(_row(task, "linear", seed, accuracy, _count(head.parameters()), stored, trainer.step_seconds(),
                         cache["base_inference_s"], note="head on cached features"))

    for method in ("full", "lora"):
        if method not in methods:
            continue
        torch.manual_seed(seed)
        model = prepare_vit_baseline(fresh(), method, lora_rank=settings["lora_rank"])
        trainer = Trainer(model, train_x, train_y, batches, lrs[method])
        trainer.run(0, steps)
        accuracy, infer = evaluate(model, test_x, test_y)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = model.state_dict() if method == "full" else {n: p for n, p in trained.items()}
        stored = safetensors_bytes(state, tmp, f"{method}.safetensors")
        rows.append(_row(task, method, seed, accuracy, _count(trained.values()), stored, trainer.step_seconds(), infer))

    if "adapter" in methods or "pear" in methods:
        torch.manual_seed(seed)
        model = fresh()
        model.requires_grad_(False)
        vistune.attach(model, vistune.AdapterConfig(**adapter_config))
        model.head.requires_grad_(True)
        warmup = settings["pear_warmup"]
        snapshot: dict[str, Any] = {}

        def on_backward(step: int) -> None:
            if "pear" in methods and step < warmup:
                accumulate_importance(model)

        trainer = Trainer(model, train_x, train_y, batches, lrs["adapter"], on_backward=on_backward)
        trainer.run(0, warmup)
        if "pear" in methods:
            snapshot["model"] = copy.deepcopy(model)
            snapshot["importance"] = vistune.importance_scores(model)
        adapter_stored = stored_tuner(model, "adapter")  # the file's size depends on shapes only
        if "adapter" in methods:  # a Pear-only run stops the adapter at the warm-up: its rows need only its size
            trainer.run(warmup, steps)
            accuracy, infer = evaluate(model, test_x, test_y)
            rows.append(_row(task, "adapter", seed, accuracy, _count(trainer.params), adapter_stored,
                             trainer.step_seconds(), infer))
        for ratio in settings["pear_ratios"] if "pear" in methods else ():
            pruned = copy.deepcopy(snapshot["model"])
            prune_and_share(pruned, ratio, importance=snapshot["importance"])
            cont = Trainer(pruned, train_x, train_y, batches, lrs["pear"])
            cont.run(warmup, steps)
            accuracy, infer = evaluate(pruned, test_x, test_y)
            stored = stored_tuner(pruned, f"pear{ratio}")
            rows.append(_row(task, f"pear-{ratio:g}", seed, accuracy, _count(cont.params), stored, cont.step_seconds(),
                             infer, stored_vs_adapter=stored / adapter_stored))

    for method in ("mosa", "mosa_hier"):
        if method not in methods:
            continue
        torch.manual_seed(seed)
        model = fresh()
        model.requires_grad_(False)
        experts = settings["mosa_experts"]
        vistune.attach(model, vistune.MoSAConfig(**adapter_config, share="down", num_experts=experts, seed=seed,
                                                 hierarchical=method == "mosa_hier",
                                                 min_experts=hier_min_experts(experts)))
        model.head.requires_grad_(True)
        trainer = Trainer(model, train_x, train_y, batches, lrs[method], kl_weight=settings["mosa_kl"])
        trainer.run(0, steps)
        params_training = _count(trainer.params)
        merge_mosa(model)
        accuracy, infer = evaluate(model, test_x, test_y)
        rows.append(_row(task, method, seed, accuracy, params_training, stored_tuner(model, method),
                         trainer.step_seconds(), infer, merged_params=_count(vistune.get_tuner(model).parameters())
                         + _count(model.head.parameters())))

    for row in rows:
        log(f"  {task.name} seed {seed} {row['method']:<9} acc {row['accuracy']:.3f}  step {row['step_seconds']*1000:.0f} ms")
    return rows


@torch.no_grad()
def _features(model: nn.Module, x: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, float]:
    model.eval()
    out, started = [], time.perf_counter()
    for i in range(0, len(x), batch):
        out.append(model.forward_head(model.forward_features(x[i : i + batch]), pre_logits=True))
    return torch.cat(out), (time.perf_counter() - started) / len(x)


def prepare_task(base: nn.Module, task, settings: dict[str, Any]) -> dict[str, Any]:
    """Normalised train (+val) / test tensors and frozen features for the linear probe (computed once per task)."""
    train_x, train_y = task.split(settings["fit_split"])
    test_x, test_y = task.split(settings.get("eval_split", "test"))
    device = next(base.parameters()).device
    cache = {"train_x": normalize(base, train_x).to(device), "train_y": train_y.to(device),
             "test_x": normalize(base, test_x).to(device), "test_y": test_y.to(device)}
    if "linear" in settings["methods"]:
        cache["features_train"], _ = _features(base, cache["train_x"])
        cache["features_test"], cache["base_inference_s"] = _features(base, cache["test_x"])
    return cache


def hier_min_experts(num_experts: int) -> int:
    """The first block's expert count for ``mosa_hier``: half the deepest block's (2 -> 4, 1 -> 2)."""
    return max(1, num_experts // 2)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per method: accuracy per task (mean over seeds), overall mean (+ std over seeds), costs."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        per_task = {t: statistics.mean(r["accuracy"] for r in mine if r["task"] == t) for t in tasks
                    if any(r["task"] == t for r in mine)}
        seeds = sorted({r["seed"] for r in mine})
        per_seed = [statistics.mean(r["accuracy"] for r in mine if r["seed"] == s) for s in seeds]
        line = {
            "method": method,
            "per_task": per_task,
            "tasks": len(per_task),  # fewer than the table's when a merged table lacks some of this method's runs
            "mean": statistics.mean(per_task.values()),
            "std_over_seeds": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
            "trainable_params": statistics.mean(r["trainable_params"] for r in mine),
            "stored_bytes": statistics.mean(r["stored_bytes"] for r in mine),
            "step_ms": 1000 * statistics.median(r["step_seconds"] for r in mine),
            "inference_ms": statistics.median(r["inference_ms_per_image"] for r in mine),
        }
        out.append(line)
    return out


def _points_apart(line: dict[str, Any], reference: dict[str, Any]) -> float:
    """Mean accuracy of ``line`` minus ``reference``'s in points, over the tasks both have."""
    common = [t for t in reference["per_task"] if t in line["per_task"]]
    if not common:
        return float("nan")
    return 100 * statistics.mean(line["per_task"][t] - reference["per_task"][t] for t in common)


def targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked on this run: MoSA >= adapter at equal inference cost; Pear-0.5 <= 0.55x the
    adapter's bytes and within 0.5 points of its accuracy."""
    by = {s["method"]: s for s in summary}
    result: dict[str, Any] = {}
    if "adapter" in by and "mosa" in by:
        a, m = by["adapter"], by["mosa"]
        result["mosa_minus_adapter_points"] = _points_apart(m, a)
        result["mosa_ge_adapter"] = result["mosa_minus_adapter_points"] >= 0
        result["mosa_stored_equals_adapter"] = m["stored_bytes"] == a["stored_bytes"]
    if "adapter" in by and "pear-0.5" in by:
        a, p = by["adapter"], by["pear-0.5"]
        result["pear50_bytes_ratio"] = p["stored_bytes"] / a["stored_bytes"]
        result["pear50_minus_adapter_points"] = _points_apart(p, a)
        result["pear50_bytes_ok"] = result["pear50_bytes_ratio"] <= 0.55
        result["pear50_accuracy_ok"] = result["pear50_minus_adapter_points"] >= -0.5
    return result


def _split_size(info: dict[str, Any], split: str) -> str:
    """Image count of ``split`` ("trainval" is train + val) from a task summary, as header text."""
    if split == "trainval":
        return f"{info['train_size']}+{info['val_size']}"
    return str(info[f"{split}_size"])


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    tasks = meta["tasks"]
    kinds = {t["name"]: t["kind"][:4] for t in meta["task_info"]}
    head = " | ".join(f"{t} ({kinds[t]})" for t in (x["name"] for x in meta["task_info"]))
    info, fit = meta["task_info"][0], meta["fit_split"]
    evaluate = meta["settings"].get("eval_split", "test")
    lines = [
        f"Adapter family on {len(tasks)} VTAB-1k-style shapes-world tasks, {meta['model']} frozen; "
        f"{meta['steps']} steps x batch {meta['batch_size']} on {fit} ({_split_size(info, fit)} images), "
        f"evaluated on {evaluate} ({_split_size(info, evaluate)} images), seeds {meta['seeds']}; "
        f"{meta['env']['device']}, "
        f"{meta['env']['threads']} thread(s); wall {meta['wall_seconds'] / 60:.1f} min"
        + (f" (the longest of {meta['parts']} parts; {sum(meta.get('part_wall_seconds', [0])) / 60:.1f} min in all)"
           if meta.get("parts") else ""),
        "",
        f"| method | {head} | mean acc (± std over seeds) | trainable params | stored bytes | step (ms) | inference (ms/img) |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    for s in summary:
        cells = " | ".join(f"{100 * s['per_task'][t]:.1f}" if t in s["per_task"] else "-" for t in tasks)
        some = f" ({s['tasks']} of {len(tasks)} tasks)" if s.get("tasks", len(tasks)) < len(tasks) else ""
        lines.append(
            f"| {s['method']} | {cells} | {100 * s['mean']:.2f} ± {100 * s['std_over_seeds']:.2f}{some} | "
            f"{s['trainable_params']:,.0f} | {s['stored_bytes']:,.0f} | {s['step_ms']:.0f} | {s['inference_ms']:.2f} |"
        )
    t = meta.get("targets", {})
    if t:
        holes = any(s.get("tasks", len(tasks)) < len(tasks) for s in summary)
        lines += ["", "Targets (issue 8)" + (", on the tasks both methods have:" if holes else ":")]
        if "mosa_ge_adapter" in t:
            lines.append(f"- MoSA - adapter: {t['mosa_minus_adapter_points']:+.2f} points "
                         f"({'met' if t['mosa_ge_adapter'] else 'NOT met'}: MoSA >= adapter); merged MoSA stores "
                         f"{'the same' if t['mosa_stored_equals_adapter'] else 'different'} bytes and has the adapter's "
                         "parameters and FLOPs")
        if "pear50_bytes_ratio" in t:
            lines.append(f"- Pear 0.5: stores {t['pear50_bytes_ratio']:.3f}x the adapter bytes "
                         f"({'met' if t['pear50_bytes_ok'] else 'NOT met'}: <= 0.55x); accuracy "
                         f"{t['pear50_minus_adapter_points']:+.2f} points vs adapter "
                         f"({'met' if t['pear50_accuracy_ok'] else 'NOT met'}: >= -0.5)")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in meta["settings"].items() if k != "methods")]
    return "\n".join(lines)


def load_model(model_dir: str | None) -> nn.Module:
    if model_dir is None:
        from ..assets import load_tiny_vit

        return load_tiny_vit()
    import timm

    return timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()


def run(tasks=DEFAULT_TASKS, seeds=(0, 1, 2), steps: int = DEFAULT_STEPS, batch_size: int = 16,
        methods=DEFAULT_METHODS, pear_ratios=(0.5, 0.75), imagefolders=(), train_size: int = 800,
        val_size: int = 200, test_size: int = 300,
        fit_split: str = "trainval", eval_split: str = "test", bottleneck: int = 16, lora_rank: int = 8,
        mosa_experts: int = DEFAULT_MOSA_EXPERTS, mosa_kl: float = 0.0, pear_warmup: float = 0.5,
        lrs: dict[str, float] | None = None, data_seed: int = 0,
        model_dir: str | None = None, output_dir: str = "benchmarks/results", name: str = "adapters",
        log: Log = print) -> dict[str, Any]:
    """Run the accuracy benchmark; write ``<name>.json`` (rows, summary, targets) and ``<name>.md``."""
    from ..data.vtab_shapes import load_imagefolder_task, make_shapes_task, task_summary

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not 0 < pear_warmup < 1:
        raise ValueError(f"pear_warmup must be a fraction of the steps in (0, 1), got {pear_warmup}")
    if not tasks and not imagefolders:
        raise ValueError("no tasks: name shapes-world tasks or give image folders")
    for ratio in pear_ratios if "pear" in methods else ():
        if not 0 < ratio < 1:  # checked here, not after the adapter's warm-up
            raise ValueError(f"Pear prune ratios must lie in (0, 1), got {ratio}")
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models run fastest on one thread, and the machine is shared
    base = load_model(model_dir).to(device)
    image_size = base.patch_embed.img_size[0]
    settings = {"methods": list(methods), "steps": steps, "batch_size": batch_size, "lrs": {**DEFAULT_LRS, **(lrs or {})},
                "bottleneck": bottleneck, "lora_rank": lora_rank, "mosa_experts": mosa_experts, "mosa_kl": mosa_kl,
                "pear_ratios": list(pear_ratios), "pear_warmup": max(1, round(pear_warmup * steps)),
                "fit_split": fit_split, "eval_split": eval_split}
    loaders = [lambda t=t: make_shapes_task(t, data_seed, train_size=train_size, val_size=val_size,
                                            test_size=test_size, image_size=image_size) for t in tasks]
    loaders += [lambda f=f: load_imagefolder_task(f, seed=data_seed, image_size=image_size, train_size=train_size,
                                                  val_size=val_size) for f in imagefolders]
    rows, task_info = [], []
    for load in loaders:
        task = load()
        task_info.append(task_summary(task))
        log(f"task {task.name} ({task.kind}, {task.num_classes} classes)")
        cache = prepare_task(base, task, settings)
        for seed in seeds:
            rows += run_task_seed(base, task, seed, settings, cache, log)
        # results so far after every task, so an interrupted run still leaves a (marked) partial table
        done = len(task_info) == len(loaders)
        summary = summarize(rows)
        meta = {"model": "tiny shapes ViT (assets/tiny-vit-shapes)" if model_dir is None else model_dir,
                "tasks": [t["name"] for t in task_info], "task_info": task_info, "seeds": list(seeds),
                "steps": steps, "batch_size": batch_size, "fit_split": fit_split, "settings": settings,
                "env": environment(device), "wall_seconds": time.perf_counter() - started,
                "complete": done}
        meta["targets"] = targets(summary)
        note = "" if done else f"PARTIAL: {len(task_info)} of {len(loaders)} tasks done\n\n"
        table = _write_results(output_dir, name, meta, summary, rows, note)
    log(table)
    return {"meta": meta, "summary": summary, "rows": rows}


def merge_results(paths: list[str], output_dir: str = "benchmarks/results", name: str = "adapters",
                  log: Log = print) -> dict[str, Any]:
    """Combine accuracy runs with the same settings, split across processes or sessions (by task, seed, method or
    Pear ratio), into one ``<name>.json`` / ``<name>.md``, as if one run had measured every row. A partial run
    (interrupted) contributes its finished tasks; cells no part measured are listed at the top of the table."""
    if len(paths) < 2:
        raise ValueError(f"merging needs at least two result files, got {len(paths)}")
    parts = [_read_part(p) for p in paths]
    first = parts[0]["meta"]
    for path, part in zip(paths, parts):
        meta = part["meta"]
        if not meta.get("complete", False):  # its finished tasks hold every seed and method: usable as they are
            log(f"{path}: a partial run; merging its {len(meta['task_info'])} finished task(s) "
                f"({', '.join(meta['tasks'])})")
        for key in ("model", "steps", "batch_size", "fit_split"):
            if meta[key] != first[key]:
                raise ValueError(f"{path} was run with another {key} ({meta[key]!r}) than {paths[0]} ({first[key]!r})")
        for key in set(meta["settings"]) | set(first["settings"]):
            if key not in SPLIT_SETTINGS and meta["settings"].get(key) != first["settings"].get(key):
                raise ValueError(f"{path} was run with another {key} ({meta['settings'].get(key)!r}) than "
                                 f"{paths[0]} ({first['settings'].get(key)!r})")
    lrs: dict[str, float] = {}
    for path, part in zip(paths, parts):
        settings = part["meta"]["settings"]
        for key in {k for m in settings["methods"] for k in LR_KEYS.get(m, (m,))}:
            if lrs.setdefault(key, settings["lrs"][key]) != settings["lrs"][key]:
                raise ValueError(f"{path} trains {key} at another learning rate ({settings['lrs'][key]}) than an "
                                 f"earlier part ({lrs[key]})")
    rows, seen = [], set()
    for path, part in zip(paths, parts):
        for row in part["rows"]:
            key = (row["task"], row["method"], row["seed"])
            if key in seen:
                raise ValueError(f"{path} measures {key} again; each (task, method, seed) must come from one run")
            seen.add(key)
            rows.append(row)
    task_info = list({t["name"]: t for part in parts for t in part["meta"]["task_info"]}.values())
    methods = {m for part in parts for m in part["meta"]["settings"]["methods"]}
    settings = {**first["settings"], "methods": [m for m in METHODS if m in methods],
                "lrs": {k: lrs[k] for k in METHODS if k in lrs},
                "pear_ratios": sorted({r for part in parts for r in part["meta"]["settings"]["pear_ratios"]})}
    walls = [w for part in parts for w in part["meta"].get("part_wall_seconds", [part["meta"]["wall_seconds"]])]
    summary = summarize(rows)
    meta = {**first, "tasks": [t["name"] for t in task_info], "task_info": task_info, "settings": settings,
            "seeds": sorted({s for part in parts for s in part["meta"]["seeds"]}),
            "wall_seconds": max(walls), "part_wall_seconds": walls, "parts": len(walls),
            "targets": targets(summary)}
    cells = {(r["method"], r["task"], r["seed"]) for r in rows}
    missing = [(s["method"], t["name"]) for s in summary for t in task_info
               if any((s["method"], t["name"], seed) not in cells for seed in meta["seeds"])]
    meta["complete"] = not missing
    note = "" if not missing else (f"INCOMPLETE: {len(missing)} (method, task) cells lack some or all seeds: "
                                   + ", ".join(f"{m} on {t}" for m, t in missing) + "\n\n")
    table = _write_results(output_dir, name, meta, summary, rows, note)
    log(table)
    return {"meta": meta, "summary": summary, "rows": rows}


def _read_part(path: str) -> dict[str, Any]:
    """One result file to merge, or a ValueError naming it."""
    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a result file of this benchmark ({error})") from None
    if not isinstance(part, dict) or "rows" not in part or "task_info" not in part.get("meta", {}):
        raise ValueError(f"{path} is not a result file of this benchmark (no meta.task_info or rows)")
    return part


def _write_results(output_dir: str, name: str, meta: dict[str, Any], summary: list[dict[str, Any]],
                   rows: list[dict[str, Any]], note: str = "") -> str:
    """Write ``<name>.json`` and ``<name>.md`` (``note`` first) atomically; return the table."""
    table = note + markdown(summary, meta)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / f"{name}.json", {"meta": meta, "summary": summary, "rows": rows})
    _write_text(output / f"{name}.md", table + "\n")
    return table


def _write_text(path: Path, text: str) -> None:
    from ..core.serialization import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- cost mode (ViT-B/16, random weights)


def _build_vit_b16(device: torch.device) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000).to(device)


def run_cost_case(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, batch size) at ViT-B/16 in this process: median step time and peak memory."""
    import vistune
    from ..tuners.mosa import mosa_consistency_loss
    from ..tuners.pear import prune_and_share

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(case.get("threads", 1))
    model = _build_vit_b16(device).train()
    method, bottleneck = case["method"], case["bottleneck"]
    if method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if method in ("adapter", "pear"):
            vistune.attach(model, vistune.AdapterConfig(bottleneck=bottleneck))
            if method == "pear":  # Pear after pruning half the adapters (the cost of the rest of training)
                prune_and_share(model, 0.5, importance={f"mlp.{i}": float(i % 3) for i in range(len(model.blocks))})
        elif method in ("mosa", "mosa_kl"):
            vistune.attach(model, vistune.MoSAConfig(bottleneck=bottleneck, share="down",
                                                     num_experts=case.get("mosa_experts", DEFAULT_MOSA_EXPERTS)))
        else:
            raise ValueError(f"unknown cost method {method!r}; choose from {COST_METHODS}")
        model.head.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = case["batch_size"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=generator).to(device)
    y = torch.randint(0, 1000, (batch,), generator=generator).to(device)

    def loss() -> torch.Tensor:
        logits = model(x)
        value = F.cross_entropy(logits.float(), y)
        if method == "mosa_kl":
            value = value + mosa_consistency_loss(logits, model(x))
        return value

    return {**case, **measure_training(lambda: (params, loss), device, case["warmup"], case["steps"])}


def cost_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["env"]
    lines = [
        f"Adapter family training cost vs full fine-tuning: ViT-B/16 224 (random weights), bottleneck "
        f"{meta['bottleneck']}, MoSA {meta.get('mosa_experts', 4)} experts, "
        f"{env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
        f"{meta['threads']} thread(s), median of {meta['steps']} steps after {meta['warmup']} warm-up, "
        "each case in a fresh process",
        "",
        "| method | batch | trainable params | peak memory (MB) | step time (ms) | memory / full | time / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['trainable_params']:,d} | {r['peak_memory_mb']:.0f} | "
                     f"{r['step_seconds'] * 1000:.1f} | {r.get('memory_vs_full', float('nan')):.3f} | "
                     f"{r.get('time_vs_full', float('nan')):.3f} |")
    lines += ["", "mosa = MoSA training without the consistency loss, mosa_kl = with it (a second forward); "
              "pear = the adapter after pruning half of the positions (shared adapters still run everywhere)."]
    return "\n".join(lines)


def run_cost(batch_sizes=(2, 8), steps: int = 2, warmup: int = 1, methods=COST_METHODS, bottleneck: int = 16,
             mosa_experts: int = DEFAULT_MOSA_EXPERTS, threads: int = 1, output_dir: str = "benchmarks/results",
             name: str = "adapters_cost", log: Log = print) -> list[dict[str, Any]]:
    """Each (method, batch) in a fresh subprocess; ratios to full fine-tuning of the same batch size."""
    unknown = sorted(set(methods) - set(COST_METHODS))
    if unknown:
        raise ValueError(f"unknown cost methods {unknown}; choose from {list(COST_METHODS)}")
    rows = []
    for batch in batch_sizes:
        for method in methods:
            log(f"measuring {method} at batch {batch} ...")
            case = {"method": method, "batch_size": batch, "steps": steps, "warmup": warmup, "bottleneck": bottleneck,
                    "mosa_experts": mosa_experts, "threads": threads}
            rows.append(run_case("vistune.bench.adapters", case))
    for row in rows:
        ref = next((r for r in rows if r["method"] == "full" and r["batch_size"] == row["batch_size"]), None)
        if ref is not None:
            row["memory_vs_full"] = row["peak_memory_mb"] / ref["peak_memory_mb"] if ref["peak_memory_mb"] else float("nan")
            row["time_vs_full"] = row["step_seconds"] / ref["step_seconds"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"bottleneck": bottleneck, "mosa_experts": mosa_experts, "steps": steps, "warmup": warmup,
            "threads": threads, "env": environment(device)}
    table = cost_markdown(rows, meta)
    write_results(rows, meta, table, output_dir, name)
    log(table)
    return rows


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 2 tasks, 1 seed, few steps, small splits")
    parser.add_argument("--cost", action="store_true", help="training cost at ViT-B/16 224 instead of accuracy")
    parser.add_argument("--tasks", nargs="*", default=None, help=f"shapes-world tasks (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--imagefolder", nargs="+", default=[], metavar="DIR",
                        help="ImageFolder task(s) (root/<class>/* or root/{train,val,test}/<class>/*); without "
                             "--tasks only these run")
    parser.add_argument("--model-dir", default=None, help="a local timm model folder (default: the shipped tiny ViT)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per method (default {DEFAULT_STEPS}, 32 epochs; cost: 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"accuracy: {' '.join(METHODS)}; cost: {' '.join(COST_METHODS)}")
    parser.add_argument("--pear-ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--bottleneck", type=int, default=16)
    parser.add_argument("--mosa-experts", type=int, default=DEFAULT_MOSA_EXPERTS,
                        help="MoSA experts per split projection (mosa_hier: rising from half this with depth)")
    parser.add_argument("--mosa-kl", type=float, default=0.0,
                        help="weight of MoSA's consistency loss (official recipe 1.0; doubles MoSA's forwards)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="override a method's learning rate")
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8], help="cost mode batch sizes")
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--name", default=None, help="results file name (default: adapters, adapters_quick or adapters_cost)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="instead of running: combine result files of runs split by task, seed, method or "
                             "Pear ratio (same other settings; a partial run gives its finished tasks) into "
                             "<output-dir>/<name>.{json,md}")


def _parse_lrs(items: list[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        method, _, value = item.partition("=")
        if method not in METHODS:
            raise ValueError(f"--lr {item!r}: unknown method {method!r}; choose from {list(METHODS)}")
        try:
            lrs[method] = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR, e.g. adapter=0.01") from None
    return lrs


def run_from_args(args: argparse.Namespace) -> None:
    if args.merge:
        merge_results(args.merge, args.output_dir, args.name or "adapters")
        return
    if args.cost:
        methods = args.methods or list(COST_METHODS)
        run_cost(args.batch_sizes, args.steps or 2, methods=methods, bottleneck=args.bottleneck,
                 mosa_experts=args.mosa_experts, output_dir=args.output_dir, name=args.name or "adapters_cost")
        return
    tasks = args.tasks if args.tasks is not None else ([] if args.imagefolder else list(DEFAULT_TASKS))
    kwargs: dict[str, Any] = dict(
        tasks=tasks, seeds=args.seeds, steps=args.steps or DEFAULT_STEPS, batch_size=args.batch_size,
        methods=args.methods or list(DEFAULT_METHODS), pear_ratios=args.pear_ratios, imagefolders=args.imagefolder,
        test_size=args.test_size, bottleneck=args.bottleneck, mosa_experts=args.mosa_experts, mosa_kl=args.mosa_kl,
        model_dir=args.model_dir, lrs=_parse_lrs(args.lr), output_dir=args.output_dir, name=args.name or "adapters",
    )
    if args.quick:
        kwargs.update(tasks=args.tasks if args.tasks is not None else ["color", "count"], seeds=args.seeds[:1],
                      steps=args.steps or 8, batch_size=16, train_size=96, val_size=32, test_size=64,
                      name=args.name or "adapters_quick")
    run(**kwargs)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, run_cost_case, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
