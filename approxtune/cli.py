"""The ``approxtune`` command line.

Every command takes a study file.  Bad input (a malformed study, a missing checkpoint or data folder, a cache of
another model) ends with a one-line ``error:`` message and exit code 2, before anything is written; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from approxtune import pipeline
from approxtune.cache import BaseCache
from approxtune.config import Study, load_study

console = Console(stderr=True)
out = Console()

CERT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[callable]:
    """A rich progress bar; yields ``advance(count)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda count: bar.advance(task, count)


def clean_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Accuracy of ``model`` on unperturbed inputs."""
    with torch.inference_mode():
        preds = torch.cat([model.eval()(x[i : i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(x), 1024)])
    return float((preds == y).float().mean())


def _model(study: Study, device: torch.device) -> torch.nn.Module:
    if not study.checkpoint.exists() and study.model.arch in pipeline.TRAINABLE:
        console.print(f"No checkpoint at {study.checkpoint}: training the {study.model.arch} base model first.")
        return _train(study).to(device)
    return pipeline.ensure_model(study).to(device)


def _train(study: Study) -> torch.nn.Module:
    with progress_bar(f"train {study.model.arch} (sigma={study.certify.sigma:g})", study.train.epochs) as advance:
        model = pipeline.train_study_model(study, progress=lambda epoch, loss: advance(1))
    console.print(f"Saved the base model to {study.checkpoint}")
    return model


def _cache(study: Study, model: torch.nn.Module, split: str, device: torch.device) -> tuple[BaseCache, float]:
    inputs = pipeline.load_inputs(study, split)
    c = study.certify
    with progress_bar(f"certify g on {len(inputs)} {split} inputs", len(inputs) * (c.n0 + c.n)) as advance:
        cache, built = pipeline.ensure_cache(
            study,
            model,
            inputs,
            split,
            device=device,
            progress=advance,
            on_rebuild=lambda why: console.print(f"[yellow]Rebuilding {study.cache_path(split)}[/]: {why}"),
        )
    verb = "Wrote" if built else "Reusing"
    console.print(f"{verb} the base cache {study.cache_path(split)}")
    return cache, clean_accuracy(model, inputs.x, inputs.y, device)


def cmd_train(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    _train(study)


def cmd_certify(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    device = pipeline.resolve_device(study, args.device)
    model = _model(study, device)
    cache, accuracy = _cache(study, model, args.split, device)
    summary = cache.summary(CERT_RADII)
    table = Table(title=f"Base certification of g on {len(cache)} {args.split} inputs")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = {
        "sigma / n0 / n / alpha": f"{cache.meta.sigma:g} / {cache.meta.n0} / {cache.meta.n} / {cache.meta.alpha:g}",
        "clean accuracy of f": f"{accuracy:.3f}",
        "ACR": f"{summary['acr']:.4f}",
    }
    rows.update({f"certified accuracy at r = {r:g}": f"{summary[f'cert_acc@{r:g}']:.3f}" for r in CERT_RADII})
    for key, value in rows.items():
        table.add_row(key, value)
    out.print(table)
    abstained = int(np.sum(cache.p_a <= 0.5))
    out.print(
        f"Abstained on {abstained} of {len(cache)} inputs; "
        f"each certificate holds with probability >= 1 - {cache.meta.alpha:g}."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="approxtune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the study's embedded base model with Gaussian noise augmentation")
    p.add_argument("study", help="study file (TOML)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("certify", help="certify the smoothed base model once and cache the result")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--split", choices=("search", "report"), default="search", help="which inputs (default: search)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override certify.device")
    p.set_defaults(func=cmd_certify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
