"""The ``approxtune`` command line.

Every command takes a study file.  Bad input (a malformed study, a missing checkpoint or data folder, a cache of
another model) ends with a one-line ``error:`` message and exit code 2, before anything is written; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from approxtune import pipeline, report, search
from approxtune.cache import BaseCache
from approxtune.config import Study, load_study
from approxtune.search import clean_accuracy

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
    return cache, clean_accuracy(model, inputs, device)


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


class StopAfterTrial:
    """First Ctrl-C: finish the running trial, then stop; a second Ctrl-C aborts it (Optuna marks it FAIL)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopAfterTrial:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]Stopping after the current trial (Ctrl-C again to abort it).[/]")

    def __call__(self, optuna_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            optuna_study.stop()


def cmd_tune(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    device = pipeline.resolve_device(study, args.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = _model(study, device)
    cache, base_accuracy = _cache(study, model, "search", device)
    inputs = pipeline.load_inputs(study, "search")
    attrs = search.study_attrs(study, cache, base_accuracy, model)
    optuna_study = search.create_study(study, attrs)
    layers = search.searched_layers(study, model)
    enqueued = search.enqueue_baselines(optuna_study, study, layers) if study.search.baselines else []
    done = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(0, study.search.trials - done)
    console.print(
        f"Study {study.name!r} ({study.storage}): {done} trials done, running {remaining}; "
        f"{len(layers)} layers searched; baselines: {', '.join(enqueued) or 'none'}; "
        f"certificates hold with probability >= {attrs['confidence']:.4g}."
    )
    if remaining:
        with progress_bar("trials", remaining) as advance, StopAfterTrial() as stopper:

            def on_result(trial: optuna.Trial, result: search.TrialResult) -> None:
                console.print(
                    f"trial {trial.number:3d}  ACR {result.acr:.4f}  acc {result.accuracy:.3f}  "
                    f"size {result.size_ratio:6.1%}  {result.seconds:5.1f}s  {result.config.summary()}",
                    highlight=False,
                )
                advance(1)

            objective = search.make_objective(study, model, inputs, cache, base_accuracy, device, on_result)
            optuna_study.optimize(
                objective,
                n_trials=remaining,
                timeout=study.search.timeout or None,
                callbacks=[stopper, MaxTrialsCallback(study.search.trials, states=(TrialState.COMPLETE,))],
            )
    _show_front(study, optuna_study, as_json=False)


def _show_front(study: Study, optuna_study: optuna.Study, as_json: bool) -> None:
    rows = report.front_rows(optuna_study)
    if as_json:
        out.print_json(json.dumps({"study": study.name, "storage": study.storage, "front": rows}))
        return
    if not rows:
        out.print("No feasible complete trial yet.")
        return
    table = Table(title=f"Pareto front of {study.name!r}: ACR up, accuracy up, size down")
    for column in ("trial", "ACR", "accuracy", "size (bytes)", "vs fp32", "layers"):
        table.add_column(column, justify="right" if column != "layers" else "left")
    for row in rows:
        label = f"{row['trial']}" + (f" ({row['baseline']})" if row["baseline"] else "")
        table.add_row(
            label,
            f"{row['acr']:.4f}",
            f"{row['accuracy']:.3f}",
            f"{row['size_bytes']:,}",
            f"{row['size_ratio']:.1%}",
            row["summary"],
        )
    out.print(table)
    png = report.plot_front(optuna_study, study.output_dir / "front.png")
    out.print(f"Plot: {png}    Dashboard: optuna-dashboard {study.storage}")


def cmd_front(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_study = search.load_existing_study(study)
    if optuna_study is None:
        raise ValueError(f"no study {study.name!r} in {study.storage}; run `approxtune tune {args.study}` first")
    _show_front(study, optuna_study, as_json=args.json)


def cmd_export(args: argparse.Namespace) -> None:
    from approxtune import export

    study = load_study(args.study)
    device = pipeline.resolve_device(study, args.device)

    def on_chosen(trial: optuna.trial.FrozenTrial, reason: str) -> None:
        attrs = trial.user_attrs
        out.print(
            f"Chosen trial: {trial.number} ({reason}): search ACR {trial.values[0]:.4f}, accuracy "
            f"{trial.values[1]:.3f}, {int(trial.values[2]):,} bytes ({attrs.get('size_ratio', float('nan')):.1%} of "
            f"fp32); {attrs.get('summary', '')}",
            highlight=False,
        )
        if not search.feasible(trial):
            console.print(f"[yellow]Trial {trial.number} violates the study's constraints (it is not feasible).[/]")

    result = export.export_trial(
        study,
        args.out,
        trial=args.trial,
        min_acr=args.min_acr,
        max_accuracy_drop=args.max_accuracy_drop,
        recheck=args.recheck,
        force=args.force,
        device=device,
        progress=progress_bar,
        log=console.print,
        on_chosen=on_chosen,
    )
    cert = result.certificate
    out.print(export.certificate_table(cert))
    out.print(cert["explanation"], highlight=False)
    reproduced, recorded = cert["search"]["reproduced_acr"], cert["search"]["acr"]
    if not np.isclose(reproduced, recorded, rtol=0, atol=1e-9):
        console.print(
            f"[yellow]The exported model's search-set ACR is {reproduced:.6f}, the trial recorded {recorded:.6f} "
            "(different device or thread count?).[/]"
        )
    out.print(
        f"Wrote {result.path}: weights {result.payload_bytes:,} bytes (the reported size {result.size_bytes:,}) + "
        f"header {result.header_bytes:,} bytes; model.pt2 (torch.export); certificate.json; "
        f"sha256 {result.sha256[:16]}...; {result.seconds:.1f}s",
        highlight=False,
    )
    out.print(
        f"Attached certificate.json and front.png to trial {cert['trial']}: optuna-dashboard {study.storage} "
        f"--artifact-dir {export.artifact_dir(study)}",
        highlight=False,
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

    p = sub.add_parser("tune", help="search per-layer compression, scored by IRS; prints the Pareto front")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override certify.device")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("front", help="show a study's Pareto front (table and PNG plot, or JSON)")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--json", action="store_true", help="print the front as JSON")
    p.set_defaults(func=cmd_front)

    p = sub.add_parser(
        "export",
        help="export a trial's compressed model (weights, torch.export program) with a held-out certificate",
        description="Export trial N (--trial), or the smallest Pareto-front model that satisfies a rule (--min-acr "
        "and/or --max-accuracy-drop, both must hold), to DIR: weights.bin + index.json (the compressed weights), "
        "config.json, model.pt2 (loads with torch.export.load, no approxtune needed) and certificate.json (the "
        "model re-certified on the held-out report inputs with fresh noise). Load it with approxtune.load_model(DIR).",
    )
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--trial", type=int, metavar="N", help="the trial number to export")
    p.add_argument("--min-acr", type=float, metavar="X", help="rule: smallest front model with search ACR >= X")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="Y",
        help="rule: smallest front model whose clean accuracy is at most Y below the base model's (fraction, 0..1)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing export in DIR")
    p.add_argument(
        "--recheck",
        choices=("irs", "scratch"),
        default="irs",
        help="held-out certificate: IRS against the report inputs' base cache (default), or Cohen's CERTIFY of the "
        "exported model from scratch on fresh noise",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="override certify.device")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
