#!/usr/bin/env python
"""The deployables against the certified torch f^p: agreement on replayed noise samples, file sizes, latency.

For each model -- the digits CNN trained as the default study trains it (40 epochs at sigma = 0.5 on the digits
training split) and a CIFAR ResNet-20 with random weights and randomised BatchNorm statistics on random [0, 1] images
(no CIFAR-10 data or checkpoint on this machine: its agreement numbers are those of an untrained network, whose
logits are closer together than a trained one's) -- and each approximation (every layer fp32, fp16, bf16, int8, int4,
and L1-pruned by half per layer at fp32 and at int4, stored sparse), the script

1. exports f^p with ``approxtune.export.export_model`` (``model.onnx`` and ``model.pt2``);
2. runs the certified torch f^p (``apply_approximation``, eager) and both deployables in their runtimes
   (ONNX Runtime CPU session, the loaded ExportedProgram) on the same noise samples, drawn exactly as certification
   draws them (``predict_under_noise``, stream ESTIMATION), and reports the share on which each deployable predicts
   f^p's class (``agreement``) and the number of samples that differ;
3. reports ``size_bytes`` and each file's size, and the overhead over ``size_bytes``;
4. times one forward pass per input at batch 1 and at a larger batch, for torch eager, the ExportedProgram and ONNX
   Runtime, interleaved round by round in one process (medians of per-round medians), with one thread each
   (``torch.set_num_threads(1)``, ``intra_op_num_threads = 1``): the machine is shared.

Usage::

    python benchmarks/bench_deploy.py --out benchmarks/deploy_results   # writes deploy_results.{md,json}
    python benchmarks/bench_deploy.py --quick                            # fewer samples and rounds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _harness import cpu_model  # benchmarks/ is on sys.path when a script runs
from torch import nn

from approxtune.approximation import ApproximationConfig, LayerChoice, apply_approximation, compressible_layers
from approxtune.certification import predict_under_noise
from approxtune.data import digits_splits
from approxtune.export import export_model
from approxtune.export.runtimes import RUNTIMES, load_deployable
from approxtune.models import build_model
from approxtune.noise import Stream, input_seeds
from approxtune.training import train_model

APPROXIMATIONS = {
    "fp32": ("fp32", 0.0),
    "fp16": ("fp16", 0.0),
    "bf16": ("bf16", 0.0),
    "int8": ("int8", 0.0),
    "int4": ("int4", 0.0),
    "fp32, pruned 50 %": ("fp32", 0.5),
    "int4, pruned 50 %": ("int4", 0.5),
}
FILES = ("model.onnx", "model.pt2")
PLANS = {
    "full": {
        "digits-cnn": {"inputs": 200, "samples": 200, "sigma": 0.5, "batch": 256, "rounds": 7, "reps": (60, 8)},
        "cifar_resnet20": {"inputs": 40, "samples": 100, "sigma": 0.25, "batch": 64, "rounds": 5, "reps": (15, 3)},
    },
    "quick": {
        "digits-cnn": {"inputs": 40, "samples": 100, "sigma": 0.5, "batch": 256, "rounds": 3, "reps": (20, 3)},
        "cifar_resnet20": {"inputs": 8, "samples": 50, "sigma": 0.25, "batch": 64, "rounds": 2, "reps": (5, 1)},
    },
}


def digits_model() -> tuple[nn.Module, torch.Tensor]:
    splits = digits_splits(0)
    model = train_model(
        "digits-cnn", splits["train"], sigma=0.5, epochs=40, batch_size=64, lr=0.003, seed=0
    )  # the default study's training
    return model.eval(), splits["report"].x


def resnet_model(count: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20").eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model, torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _median_latency(function, x: torch.Tensor, reps: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            function(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) / len(x)


def measure(name: str, base: nn.Module, inputs: torch.Tensor, plan: dict, work: Path) -> list[dict]:
    rows = []
    layers = compressible_layers(base)
    x = inputs[: plan["inputs"]]
    seeds = input_seeds(12345, np.arange(len(x)))
    for label, (precision, prune) in APPROXIMATIONS.items():
        config = ApproximationConfig(dict.fromkeys(layers, LayerChoice(precision, prune)))
        approx = apply_approximation(base, config).eval()
        result = export_model(
            base, config, work / f"{name}-{precision}-{prune}", architecture=name, example_input=x[:2]
        )
        functions = {"torch eager": approx}
        functions.update({rt.artifact: load_deployable(rt, result.path) for rt in RUNTIMES.values()})
        sampled = (seeds, Stream.ESTIMATION, 0, plan["samples"], plan["sigma"])
        classes = {
            key: predict_under_noise(fn, x, *sampled, batch_size=plan["batch"], device="cpu")
            for key, fn in functions.items()
        }
        reference = classes["torch eager"]
        row = {
            "model": name,
            "approximation": label,
            "samples": int(reference.size),
            "size_bytes": result.size_bytes,
            "weights.bin": result.payload_bytes,
            **{artifact: nbytes for artifact, nbytes in result.deployable_bytes.items()},
        }
        for artifact in result.deployable_bytes:
            row[f"agreement {artifact}"] = float((classes[artifact] == reference).mean())
            row[f"differ {artifact}"] = int((classes[artifact] != reference).sum())
        batches = {1: x[:1].contiguous(), plan["batch"]: x[:1].expand(plan["batch"], *x.shape[1:]).contiguous()}
        for size, reps in zip(batches, plan["reps"], strict=True):
            per_round = {key: [] for key in functions}
            for r in range(plan["rounds"]):
                order = list(functions) if r % 2 == 0 else list(reversed(functions))  # alternate who goes first
                for key in order:
                    per_round[key].append(_median_latency(functions[key], batches[size], reps))
            for key, values in per_round.items():
                row[f"latency {key} b{size}"] = statistics.median(values)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def write_markdown(path: Path, rows: list[dict], meta: dict, plans: dict) -> None:
    lines = [
        "# Deployables against the certified torch f^p: agreement, size, latency",
        "",
        "Generated by `benchmarks/bench_deploy.py` (raw numbers: `deploy_results.json`).",
        "",
        f"- command: `{meta['command']}` ({meta['seconds']:.0f} s)",
        f"- date: {meta['date']}",
        f"- machine: nproc {meta['nproc']}, CPU `{meta['cpu']}`, Python {meta['python']}, load average at start "
        f"{meta['load_start']}, at end {meta['load_end']} (shared machine)",
        f"- torch {meta['torch']}, onnxruntime {meta['onnxruntime']}; one thread per runtime",
        "- digits CNN: trained as the default study trains it (40 epochs, sigma 0.5), the digits report inputs; "
        "ResNet-20: **random weights** and randomised BatchNorm statistics, random [0, 1] images",
        "",
        "## Agreement with f^p on the same noise samples",
        "",
        "Share of noise samples (inputs x samples, drawn as certification draws them) on which each deployable "
        "predicts the class of the torch f^p that approxtune certifies (eager, `apply_approximation`); in brackets "
        "the number of samples that differ.",
        "",
    ]
    for name, plan in plans.items():
        lines += [
            f"### {name}: {plan['inputs']} inputs x {plan['samples']} samples, sigma {plan['sigma']}",
            "",
            "| approximation | samples | model.onnx (ONNX Runtime) | model.pt2 (ExportedProgram) |",
            "|---|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["model"] == name):
            lines.append(
                f"| {row['approximation']} | {row['samples']:,} | {row['agreement model.onnx']:.4%} "
                f"({row['differ model.onnx']}) | {row['agreement model.pt2']:.4%} ({row['differ model.pt2']}) |"
            )
        lines.append("")
    lines += [
        "## File sizes against size_bytes",
        "",
        "| model | approximation | size_bytes | weights.bin | model.onnx (+ overhead) | model.pt2 (+ overhead) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        size = row["size_bytes"]
        cells = [f"{row[f]:,} (+{row[f] - size:,}, {100 * (row[f] - size) / size:.1f} %)" for f in FILES]
        lines.append(
            f"| {row['model']} | {row['approximation']} | {size:,} | {row['weights.bin']:,} | {cells[0]} | {cells[1]} |"
        )
    lines += [
        "",
        "## Latency per input (µs, median over rounds of the median over repetitions; one thread)",
        "",
    ]
    for name, plan in plans.items():
        big = plan["batch"]
        lines += [
            f"### {name}",
            "",
            f"| approximation | torch eager b1 | model.pt2 b1 | model.onnx b1 | torch eager b{big} | model.pt2 b{big} "
            f"| model.onnx b{big} |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in rows if r["model"] == name):
            cells = [
                _us(row[f"latency {key} b{size}"])
                for size in (1, big)
                for key in ("torch eager", "model.pt2", "model.onnx")
            ]
            lines.append(f"| {row['approximation']} | " + " | ".join(cells) + " |")
        lines.append("")
    marker = "<!-- notes: everything below this line is kept when the script rewrites this file -->"
    notes = ""
    if path.is_file() and marker in path.read_text():
        notes = path.read_text().split(marker, 1)[1]
    path.write_text("\n".join(lines) + "\n" + marker + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    parser.add_argument("--models", nargs="+", default=list(PLANS["full"]), choices=list(PLANS["full"]))
    args = parser.parse_args()
    torch.set_num_threads(1)
    plans = {name: PLANS["quick" if args.quick else "full"][name] for name in args.models}
    started, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans.items():
            base, inputs = digits_model() if name == "digits-cnn" else resnet_model(plan["inputs"])
            rows += measure(name, base, inputs, plan, Path(tmp))
    meta = {
        "command": "python benchmarks/bench_deploy.py " + " ".join(sys.argv[1:]),
        "seconds": time.perf_counter() - started,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "load_start": tuple(round(v, 2) for v in load_start),
        "load_end": tuple(round(v, 2) for v in os.getloadavg()),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "plans": plans, "rows": rows}, indent=1) + "\n")
        write_markdown(Path(f"{args.out}.md"), rows, meta, plans)


if __name__ == "__main__":
    main()
