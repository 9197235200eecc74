"""The ``approxtune`` command line.

Every command takes a study file.  Bad input (a malformed study, a missing checkpoint or data folder, a cache of
another model) ends with a one-line ``error:`` message and exit code 2, before anything is written; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from approxtune import cache as cache_mod
from approxtune import pipeline, report, search
from approxtune.cache import BaseCache, CacheError, CacheMeta, NoiseMismatchError, load_cache
from approxtune.config import Study, load_study
from approxtune.data import Inputs
from approxtune.search import clean_accuracy

console = Console(stderr=True)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials that count towards search.trials: a trial stopped by racing was a candidate evaluated."""
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
            on_adopt=console.print,
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
    if args.shard is not None or args.merge:
        _certify_split(study, args, device)
        return
    model = _model(study, device)
    cache, accuracy = _cache(study, model, args.split, device)
    _print_certification(cache, accuracy, args.split)


def _certify_split(study: Study, args: argparse.Namespace, device: torch.device) -> None:
    """``certify --shard I/K`` (one part of the inputs, into ``<cache>.partial/``) or ``certify --merge``."""
    shard = cache_mod.parse_shard(args.shard) if args.shard is not None else None
    if not study.checkpoint.exists():
        raise ValueError(
            f"no checkpoint at {study.checkpoint}: shards and merges use the model every shard shares; train it once "
            f"first (approxtune train {args.study}, or put the checkpoint there / set model.checkpoint)"
        )
    model = pipeline.ensure_model(study).to(device)
    inputs = pipeline.load_inputs(study, args.split)
    path = study.cache_path(args.split)
    expected = pipeline.expected_meta(study, model, inputs, args.split)
    pipeline.adopt_legacy_cache(study, args.split, expected, console.print)
    c = study.certify
    settings = pipeline.certify_settings(study, args.split)
    existing = _matching_cache(path, expected)
    if existing is not None:
        console.print(f"The base cache {path} is already complete.")
        if args.merge:
            _print_certification(existing, clean_accuracy(model, inputs, device), args.split)
        return
    if args.merge:
        cache = cache_mod.merge_base_cache(model, inputs, path, settings, device=device)
        console.print(f"Merged the shards into the base cache {path}")
        _print_certification(cache, clean_accuracy(model, inputs, device), args.split)
        return
    i, k = shard
    chunks = cache_mod.chunk_ranges(len(inputs), c.n0 + c.n)
    mine = sum(hi - lo for lo, hi in chunks[i::k])
    with progress_bar(f"certify shard {i}/{k}: {mine} of {len(inputs)} inputs", mine * (c.n0 + c.n)) as advance:
        result = cache_mod.certify_shard(
            model, inputs, path, shard, settings, batch_size=c.batch_size, device=device, progress=advance
        )
    out.print(
        f"Shard {i}/{k}: certified {len(result.certified)} chunks, reused {len(result.reused)}; "
        f"{result.chunks_done} of {result.chunks_total} chunks are in {result.partial}.",
        highlight=False,
    )
    if result.complete:
        out.print(f"All chunks are done: merge them with `approxtune certify {args.study} --merge`.", highlight=False)
    else:
        out.print(f"When every shard has finished: `approxtune certify {args.study} --merge` (once).", highlight=False)


def _matching_cache(path: Path, expected: CacheMeta) -> BaseCache | None:
    try:
        cache = load_cache(path)
        cache.check(expected)
        return cache
    except NoiseMismatchError:
        raise  # another installation can replay it: never certify over it
    except CacheError:
        return None


def _print_certification(cache: BaseCache, accuracy: float, split: str) -> None:
    summary = cache.summary(CERT_RADII)
    table = Table(title=f"Base certification of g on {len(cache)} {split} inputs")
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
    shared = search.is_shared_storage(study.storage)
    if shared:
        # One of several workers: it must not train a model or certify g on its own, racing the others.
        model, inputs, cache, base_accuracy = _worker_artifacts(study, args, device)
    else:
        model = _model(study, device)
        cache, base_accuracy = _cache(study, model, "search", device)
        inputs = pipeline.load_inputs(study, "search")
    attrs = search.study_attrs(study, cache, base_accuracy, model)
    layers = search.searched_layers(study, model)
    opened = search.create_study(study, attrs, layers)
    optuna_study = opened.study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna checks for stale trials only when a trial starts; a study that needs no more trials would otherwise
        # keep the trial of a worker that died near its end RUNNING for ever.
        optuna.storages.fail_stale_trials(optuna_study)
    done = len(optuna_study.get_trials(deepcopy=False, states=FINISHED))
    remaining = max(0, study.search.trials - done)
    how = f"created it; baselines: {', '.join(opened.enqueued) or 'none'}" if opened.created else "joined it"
    console.print(
        f"Study {study.name!r} ({search.masked_url(study.storage)}): worker {search.worker_id()} {how}; "
        f"{done} trials done, running up to {remaining}; {len(layers)} layers searched; "
        f"certificates hold with probability >= {attrs['confidence']:.4g}.",
        highlight=False,
    )
    if remaining:
        fp32_size = attrs["fp32_size_bytes"]
        with progress_bar("trials", remaining) as advance, StopAfterTrial() as stopper:

            def on_result(trial: optuna.Trial, result: search.TrialResult | search.Stopped) -> None:
                if isinstance(result, search.Stopped):
                    acr, accuracy, size = result.upper
                    line = f"ACR ≤{acr:.4f} acc {accuracy:.3f}  size {size / fp32_size:6.1%}  {result.seconds:5.1f}s"
                    line += f"  stopped at {result.stage:.1%} of its samples: {result.reason}"
                else:
                    line = f"ACR {result.acr:.4f}  acc {result.accuracy:.3f}  size {result.size_ratio:6.1%}"
                    line += f"  {result.seconds:5.1f}s  {result.config.summary()}"
                    if result.same_as is not None:
                        line += f"  (same configuration as trial {result.same_as}: its certificate, no samples)"
                console.print(f"trial {trial.number:3d}  {line}", highlight=False)
                advance(1)

            objective = search.make_objective(study, model, inputs, cache, base_accuracy, device, on_result)
            optuna_study.optimize(
                objective,
                n_trials=remaining,
                timeout=study.search.timeout or None,
                callbacks=[stopper, MaxTrialsCallback(study.search.trials, states=FINISHED)],
            )
    finished = optuna_study.get_trials(deepcopy=False, states=FINISHED)
    stopped = sum(t.state == TrialState.PRUNED for t in finished)
    if stopped:
        console.print(f"Racing stopped {stopped} trial(s) early: they could not reach the front (search.race).")
    repeats = sum(t.user_attrs.get("same_as") is not None for t in finished)
    if repeats:
        console.print(f"{repeats} trial(s) repeated an earlier configuration and took its result without sampling.")
    _show_front(study, optuna_study, as_json=False)


def _worker_artifacts(
    study: Study, args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, Inputs, BaseCache, float]:
    """The model and the base cache of a worker on a shared study storage: both must exist and match the study."""
    first = (
        f"run `approxtune certify {args.study}` once first (or `--shard I/K` on several machines, then `--merge`), "
        "with the study's output_dir on storage every worker sees"
    )
    if not study.checkpoint.exists():
        raise ValueError(
            f"no checkpoint at {study.checkpoint}; with a shared study storage ({search.masked_url(study.storage)}) "
            f"workers neither train nor certify: {first}"
        )
    model = pipeline.ensure_model(study).to(device)
    inputs = pipeline.load_inputs(study, "search")
    path = study.cache_path("search")
    try:
        cache = load_cache(path)
    except CacheError as exc:
        raise CacheError(
            f"{str(exc).split(';')[0]}; with a shared study storage ({search.masked_url(study.storage)}) workers do "
            f"not certify g themselves, which would race the other workers: {first}"
        ) from None
    try:
        cache.check(pipeline.expected_meta(study, model, inputs, "search"))
    except CacheError as exc:
        raise CacheError(
            f"{exc}\nWorkers on a shared study storage never rebuild the cache the others read: fix the study file or "
            f"the model checkpoint, or {first}"
        ) from None
    console.print(f"Reusing the base cache {path} (read-only)")
    return model, inputs, cache, clean_accuracy(model, inputs, device)


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

    p = sub.add_parser(
        "certify",
        help="certify the smoothed base model once and cache the result",
        description="Certify the smoothed base model g once and write the base cache. To split the work over "
        "processes or machines: run `--shard I/K` for I = 0 .. K-1 (each certifies chunks I, I+K, I+2K, ... of the "
        "inputs into <cache>.partial/, on storage they share or copied together afterwards), then `--merge` once: "
        "the merged cache is byte-identical to a one-process run.",
    )
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--split", choices=("search", "report"), default="search", help="which inputs (default: search)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override certify.device")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--shard", metavar="I/K", help="certify only shard I of K (I counted from 0) into <cache>.partial/; no cache"
    )
    split.add_argument("--merge", action="store_true", help="merge the finished shards into the base cache")
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def tune_malloc() -> bool:
    """Stop glibc from unmapping and trimming activation buffers after every forward pass.

    With glibc's defaults, batches of a few hundred samples make it map and unmap the activation buffers on every
    call: the certification engine measured 1.4-2.7x slower on ResNet-20 and up to 1.6x on the digits CNN
    (benchmarks/engine_results.md).  The cost is memory that freed buffers keep.  Set APPROXTUNE_MALLOC=default (or
    your own GLIBC_TUNABLES malloc settings) to keep glibc's behaviour.  Returns whether the setting was applied.
    """
    if os.environ.get("APPROXTUNE_MALLOC") == "default" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
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
