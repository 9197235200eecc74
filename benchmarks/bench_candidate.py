"""Time building a candidate approximation ``f^p`` (``apply_approximation``) for CIFAR ResNet-20 and the digits CNN.

Every preset of :data:`approxtune.approximation.PRESETS` is timed, plus a random mixed per-layer config (precision and
within-layer pruning drawn per layer), a random mixed precision config with global pruning, and — separately — the
size computation (``model_size_bytes``, which compresses the layers once more).  Reports the median (and min / p90)
of ``--reps`` repetitions after one warm-up, for each torch intra-op thread count in ``--threads`` (default: 1 and
torch's default), and writes them as markdown::

    python benchmarks/bench_candidate.py --reps 30 --out benchmarks/candidate_results.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _harness import cpu_model  # benchmarks/ is on sys.path when a script runs
from torch import nn

from approxtune.approximation import (
    PRECISIONS,
    PRESETS,
    ApproximationConfig,
    LayerChoice,
    apply_approximation,
    compressible_layers,
    model_size_bytes,
    preset,
    size_ratio,
)
from approxtune.models import build_model

MODELS = ("cifar_resnet20", "digits-cnn")


def random_mixed(model: nn.Module, seed: int, global_prune: float = 0.0) -> ApproximationConfig:
    """A random precision per layer, and (without ``global_prune``) a random pruning amount in {0, .1, .2, .3}."""
    rng = random.Random(seed)
    layers = {
        name: LayerChoice(rng.choice(PRECISIONS), 0.0 if global_prune else rng.choice((0.0, 0.1, 0.2, 0.3)))
        for name in compressible_layers(model)
    }
    return ApproximationConfig(layers, global_prune)


def time_ms(fn: Callable[[], object], reps: int) -> tuple[float, float, float]:
    """(median, min, p90) wall time of ``fn`` in milliseconds over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]


def machine(default_threads: int) -> str:
    """Markdown lines describing this machine."""
    cpu = cpu_model()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    return (
        f"- `nproc`: {nproc}; torch's default thread count: {default_threads}\n"
        f"- CPU: {cpu}\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    )


def bench_models(reps: int, threads: int) -> list[tuple]:
    """One row per (model, config, timed function) at the current torch thread count."""
    torch.manual_seed(0)
    rows = []
    for arch in MODELS:
        model = build_model(arch).eval()
        params = sum(p.numel() for p in model.parameters())
        configs = {name: preset(name, model) for name in PRESETS}
        configs["mixed (random, seed 0)"] = random_mixed(model, seed=0)
        configs["mixed + global prune 0.2"] = random_mixed(model, seed=1, global_prune=0.2)
        for label, config in configs.items():
            median, best, p90 = time_ms(lambda m=model, c=config: apply_approximation(m, c), reps)
            rows.append(
                (arch, params, label, "apply_approximation", threads, median, best, p90, size_ratio(model, config))
            )
            print(
                f"{arch:15s} {label:26s} threads {threads} apply {median:7.2f} ms (min {best:.2f}, p90 {p90:.2f})",
                flush=True,
            )
        mixed = configs["mixed (random, seed 0)"]
        median, best, p90 = time_ms(lambda m=model, c=mixed: model_size_bytes(m, c), reps)
        rows.append((arch, params, "mixed (random, seed 0)", "model_size_bytes", threads, median, best, p90, None))
        median, best, p90 = time_ms(lambda m=model: copy.deepcopy(m), reps)
        rows.append((arch, params, "(none)", "copy.deepcopy only", threads, median, best, p90, None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per configuration (>= 20)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("candidate_results.md"))
    parser.add_argument("--threads", type=int, nargs="+", help="torch thread counts (default: 1 and torch's default)")
    args = parser.parse_args(argv)
    if args.reps < 20:
        parser.error("--reps must be at least 20")
    load_before = os.getloadavg()
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(args.threads or [1, default_threads]))
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rows += bench_models(args.reps, threads)
    torch.set_num_threads(default_threads)

    command = "python " + " ".join(["benchmarks/bench_candidate.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Building a candidate approximation",
        "",
        "Wall time of `apply_approximation(model, config)` (deep copy, pruning masks, compress → decompress of every",
        f"compressible layer), median of {args.reps} repetitions after one warm-up; model in eval mode, CPU.",
        "",
        machine(default_threads),
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs share these cores)",
        f"- command: `{command}`",
        "",
        "| model | params | config | what | threads | median ms | min ms | p90 ms | size ratio |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for arch, params, label, what, threads, median, best, p90, ratio in rows:
        ratio_text = "" if ratio is None else f"{ratio:.4f}"
        lines.append(
            f"| {arch} | {params:,} | {label} | {what} | {threads} | {median:.2f} | {best:.2f} | {p90:.2f} "
            f"| {ratio_text} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
