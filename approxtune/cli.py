"""The ``approxtune`` command line: a thin layer over the Python API (:mod:`approxtune.api`) and the export.

Every command takes a study file.  Bad input (a malformed study, a missing checkpoint or data folder, a cache of
another model) ends with a one-line ``error:`` message and exit code 2, before anything is written; ``--debug`` shows
the traceback instead.

Each command imports the modules it runs inside its function: the ones that run models import torch (seconds), the
front imports matplotlib and plotly, and ``--help`` none of them (``benchmarks/cli_results.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from approxtune.config import Study, load_study
from approxtune.progress import Reporter
from approxtune.storage import load_existing_study
from approxtune.trials import feasible, front_digest, front_files, front_files_current

if TYPE_CHECKING:
    from approxtune.cache import BaseCache

console = Console(stderr=True)
reporter = Reporter(console)
out = Console()

CERT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def progress_bar(description: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(count)``."""
    return reporter.progress(description, total)


def cmd_train(args: argparse.Namespace) -> None:
    from approxtune import pipeline

    study = load_study(args.study)
    with progress_bar(f"train {study.model.builtin_arch} (sigma={study.certify.sigma:g})", study.train.epochs) as bar:
        pipeline.train_study_model(study, progress=lambda epoch, loss: bar(1))
    reporter.info(f"Saved the base model to {study.checkpoint}")


def cmd_certify(args: argparse.Namespace) -> None:
    from approxtune import api

    study = load_study(args.study)
    if args.shard is not None or args.merge:
        _certify_split(study, args)
        return
    result = api.certify(study=study, split=args.split, device=args.device, reporter=reporter)
    _print_certification(result.cache, result.accuracy, args.split)


def _certify_split(study: Study, args: argparse.Namespace) -> None:
    """``certify --shard I/K`` (one part of the inputs, into ``<cache>.partial/``) or ``certify --merge``."""
    from approxtune import cache as cache_mod
    from approxtune import pipeline
    from approxtune.cache import CacheDamagedError
    from approxtune.job import prepare
    from approxtune.search import clean_accuracy

    shard = cache_mod.parse_shard(args.shard) if args.shard is not None else None
    if pipeline.needs_training(study):
        raise ValueError(
            f"no checkpoint at {study.checkpoint}: shards and merges use the model every shard shares; train it once "
            f"first (approxtune train {args.study}, or put the checkpoint there / set model.checkpoint)"
        )
    job = prepare(study, device=args.device, no_training=f"no checkpoint at {study.checkpoint}", say=reporter.info)
    model, device, inputs = job.model, job.device, job.inputs(args.split)
    path = study.cache_path(args.split)
    c = study.certify
    settings = pipeline.certify_settings(study, args.split)
    # Shards share the cache's lock, a merge holds it alone: a shard or merge that waited sees the cache complete.
    with cache_mod.build_lock(path, shared=shard is not None, say=reporter.info):
        try:  # the merge sets a damaged cache aside (it holds the lock alone); a shard leaves it to the merge
            existing = pipeline.reusable_cache(
                study,
                model,
                inputs,
                args.split,
                on_rebuild=lambda why: reporter.info(f"Not reusing {path}: {why}"),
                on_adopt=reporter.info,
                repair=args.merge,
            )
        except CacheDamagedError as exc:
            reporter.info(f"The base cache {path} is damaged ({exc.problem}); the merge will set it aside.")
            existing = None
        if existing is not None:
            reporter.info(f"The base cache {path} is already complete.")
            if args.merge:
                _print_certification(existing, clean_accuracy(model, inputs, device), args.split)
            return
        if args.merge:
            cache = cache_mod.merge_base_cache(model, inputs, path, settings, device=device)
            reporter.info(f"Merged the shards into the base cache {path}")
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
        reporter.warn("Stopping after the current trial (Ctrl-C again to abort it).")

    def __call__(self, optuna_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.requested:
            optuna_study.stop()


def cmd_tune(args: argparse.Namespace) -> int:
    from approxtune import api, pipeline

    study = load_study(args.study)
    with StopAfterTrial() as stopper:
        result = api.tune(study=study, device=args.device, reporter=reporter, callbacks=[stopper])
    _show_front(study, result.study, as_json=False)
    if not study.cache_path("report").exists():
        out.print(f"Before `approxtune export`, {pipeline.report_cache_hint(study)}.", highlight=False)
    return INTERRUPTED if stopper.requested else 0  # scripts can tell a stopped run from a finished one


def _show_front(
    study: Study, optuna_study: optuna.Study, as_json: bool, curves: bool = False, trials: str | None = None
) -> None:
    from approxtune import report

    artifacts = study.artifact_dir
    drawn = _draw_curves(study, optuna_study, trials, artifacts) if curves else None
    rows = report.front_rows(optuna_study)
    if as_json:
        document = {"study": study.name, "storage": study.storage, "base": report.base_row(optuna_study), "front": rows}
        if drawn is not None:
            document["curves"] = str(drawn)
        out.print_json(json.dumps(document))
        return
    table = report.front_table(optuna_study)
    if table is None:
        out.print("No feasible complete trial yet.")
        return
    out.print(table)
    png, html = front_files(study.output_dir)
    if not front_files_current(study.output_dir, front_digest(optuna_study)):
        from approxtune import plots  # matplotlib and plotly: imported only to draw (about 0.5 s)

        plots.write_front(optuna_study, study.output_dir)
    out.print(f"Plot: {png} (hover: {html.name})", highlight=False)
    if drawn is not None:
        out.print(f"Certified accuracy curves: {drawn}", highlight=False)
    out.print(
        f"Dashboard: optuna-dashboard {study.storage} --artifact-dir {artifacts}", highlight=False, soft_wrap=True
    )


def _draw_curves(study: Study, optuna_study: optuna.Study, trials: str | None, artifacts: Path) -> Path:
    """``front --curves``: g, ``trials`` (default: fp32 and front trials spread over size) and their exports."""
    from approxtune import plots, report

    numbers = report.parse_trials(trials) if trials else report.default_curve_trials(optuna_study)
    base = report.base_radii(study, optuna_study)
    curves, notes = report.curves(optuna_study, numbers, base, artifacts)
    if base is None:
        notes.insert(0, f"g's curve is left out: {study.cache_path('search')} is missing or not this study's cache")
    for note in notes:
        reporter.warn(note)
    title = f"{study.name}: certified accuracy against radius"
    return plots.plot_curves(curves, study.output_dir / "curves.png", title)


def cmd_front(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    optuna_study = load_existing_study(study)
    if optuna_study is None:
        raise ValueError(f"no study {study.name!r} in {study.storage}; run `approxtune tune {args.study}` first")
    curves = args.curves or args.trials is not None
    _show_front(study, optuna_study, as_json=args.json, curves=curves, trials=args.trials)


_TUNED_FIRST = "export needs the model the study was tuned with (run `approxtune tune` first)"


def cmd_export(args: argparse.Namespace) -> None:
    from approxtune import export
    from approxtune.job import prepare

    study = load_study(args.study)
    job = prepare(
        study, device=args.device, no_training=f"no checkpoint at {study.checkpoint}: {_TUNED_FIRST}", say=reporter.info
    )

    def on_chosen(trial: optuna.trial.FrozenTrial, reason: str) -> None:
        attrs = trial.user_attrs
        out.print(
            f"Chosen trial: {trial.number} ({reason}): search ACR {trial.values[0]:.4f}, accuracy "
            f"{trial.values[1]:.3f}, {int(trial.values[2]):,} bytes ({attrs.get('size_ratio', float('nan')):.1%} of "
            f"fp32); {attrs.get('summary', '')}",
            highlight=False,
        )
        if not feasible(trial):
            reporter.warn(f"Trial {trial.number} violates the study's constraints (it is not feasible).")

    result = export.export_trial(
        job,
        args.out,
        trial=args.trial,
        min_acr=args.min_acr,
        max_accuracy_drop=args.max_accuracy_drop,
        recheck=args.recheck,
        runtime=args.runtime,
        force=args.force,
        progress=progress_bar,
        log=reporter.info,
        on_chosen=on_chosen,
    )
    cert = result.certificate
    out.print(export.certificate_table(cert))
    out.print(cert["explanation"], highlight=False)
    out.print(cert["report_set"]["note"], highlight=False)
    reproduced, recorded = cert["search"]["reproduced_acr"], cert["search"]["acr"]
    if not np.isclose(reproduced, recorded, rtol=0, atol=1e-9):
        reporter.warn(
            f"The exported model's search-set ACR is {reproduced:.6f}, the trial recorded {recorded:.6f} "
            "(different device or thread count?)."
        )
    size = result.size_bytes
    deployables = "; ".join(
        f"{name} {nbytes:,} bytes (size_bytes + {nbytes - size:,})" for name, nbytes in result.deployable_bytes.items()
    )
    out.print(
        f"Wrote {result.path}: weights {result.payload_bytes:,} bytes (the reported size {size:,}) + header "
        f"{result.header_bytes:,} bytes; {deployables}; certificate.json; sha256 {result.sha256[:16]}...; "
        f"{result.seconds:.1f}s",
        highlight=False,
    )
    if result.not_attached:
        names = ", ".join(p.name for p in result.not_attached)
        limit = export.artifacts.ARTIFACT_MAX_BYTES
        reporter.warn(f"Not attached to the trial (larger than the {limit:,}-byte artifact limit): {names}")
    out.print(
        f"Attached the exported files, front.png and front.html to trial {cert['trial']}, with its held-out ACR, "
        f"accuracy and "
        f"export path as user attributes: optuna-dashboard {study.storage} --artifact-dir {study.artifact_dir}",
        highlight=False,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from approxtune import export

    result = export.verify(args.directory, study=args.study, runtime=args.runtime, progress=progress_bar)
    for check in result.checks:
        recorded, recomputed = check.recorded, check.recomputed
        head = (
            f"{check.artifact} in {check.runtime} {recorded['runtime_version']} (SHA-256 "
            f"{recorded['artifact_sha256'][:16]}... matches): ACR {recomputed['acr']:.4f}, accuracy "
            f"{recomputed['accuracy']:.3f} on {len(recomputed['per_input'])} report inputs"
        )
        if check.reproduced:
            out.print(f"{head}: reproduced", highlight=False)
            continue
        out.print(f"{head}: [bold red]NOT reproduced[/]", highlight=False)
        for line in (*check.differences, *(f"this run differs in {note}" for note in check.notes)):
            out.print(f"  {escape(line)}", highlight=False)
    return 0 if result.reproduced else 1


DESCRIPTION = (
    "Find compressed versions of a PyTorch classifier that stay certifiably robust: certify the smoothed base model "
    "once, search per-layer quantization and pruning with every trial certified by incremental randomized smoothing, "
    "and export the chosen model with a held-out certificate. Every command takes a study file (TOML)."
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # accepted before the command and after it
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more output: Optuna's log (twice: debug)"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or messages, results only",
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors"
    )
    parser = argparse.ArgumentParser(prog="approxtune", description=DESCRIPTION, parents=[common])
    parser.add_argument("--version", action="version", version=f"approxtune {version('approxtune')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])

    p = sub.add_parser("train", help="train the study's embedded base model with Gaussian noise augmentation")
    p.add_argument("study", help="study file (TOML)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "certify",
        help="certify the smoothed base model once and cache the result",
        description="Certify the smoothed base model g once and write the base cache. To split the work over "
        "processes or machines: run --shard I/K for I = 0 .. K-1 (each certifies chunks I, I+K, I+2K, ... of the "
        "inputs into <cache>.partial/, on storage they share or copied together afterwards), then --merge once: "
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

    p = sub.add_parser("front", help="show a study's Pareto front (table, front.png and front.html, or JSON)")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument("--json", action="store_true", help="print the front as JSON")
    p.add_argument(
        "--curves",
        action="store_true",
        help="also draw certified accuracy against radius into <output_dir>/curves.png: the base model g, the trials "
        "of --trials and the held-out certificates of their exports",
    )
    p.add_argument(
        "--trials",
        metavar="N,M,...",
        help="the trials --curves draws (implies --curves; default: fp32 and front trials spread over size)",
    )
    p.set_defaults(func=cmd_front)

    p = sub.add_parser(
        "export",
        help="export a trial's compressed model (weights, ONNX, torch.export) with a held-out certificate per runtime",
        description="Export trial N (--trial), or the smallest Pareto-front model that satisfies a rule (--min-acr "
        "and/or --max-accuracy-drop, both must hold), to DIR: weights.bin + index.json (the compressed weights), "
        "config.json, model.onnx (ONNX Runtime) and model.pt2 (torch.export.load), both compressed and runnable "
        "without approxtune, and certificate.json: each shipped file re-certified in its own runtime on the held-out "
        "report inputs with noise the search never saw. Load the weights with approxtune.load_model(DIR); check the "
        "certificate with approxtune verify DIR.",
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
    _runtime_option(p, "which deployables to write and certify, each in its runtime")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override certify.device")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "verify",
        help="recompute an export's certificate on this machine and check its files' hashes",
        description="Recompute the held-out certificate of the export DIR from its files and the study's report "
        "inputs and base cache, after checking every file's SHA-256. Exit 0: reproduced; 1: not reproduced (what "
        "differs is printed); 2: bad input (changed or truncated files, a missing runtime package, other report "
        "inputs or cache). Writes nothing.",
    )
    p.add_argument("directory", metavar="DIR", help="an export directory (from approxtune export)")
    p.add_argument("--study", metavar="STUDY.toml", help="study file (default: the one the export was made from)")
    _runtime_option(p, "which certificates to recompute")
    p.set_defaults(func=cmd_verify)
    return parser


def _runtime_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--runtime", default="all", metavar="R", help=f"{what}: onnxruntime, torch or all (default: all)"
    )


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


INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (128 + SIGINT, the shell's convention)."""


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    reporter.quiet = getattr(args, "quiet", False)
    reporter.verbosity = getattr(args, "verbose", 0)
    reporter.set_optuna_verbosity()
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
