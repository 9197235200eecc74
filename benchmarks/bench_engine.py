#!/usr/bin/env python
"""Throughput of the certification engine against the bare forward pass, with and without a tuned glibc allocator.

For each model (the digits CNN, 1x8x8, and a randomly initialised CIFAR ResNet-20, 3x32x32) and each batch size B:

* **bare**: ``model(x).argmax(1)`` on one fixed, preallocated batch of B samples in ``torch.inference_mode()``;
* **engine**: ``approxtune.certification.predict_under_noise(model, inputs, seeds, ESTIMATION, 0, n, sigma,
  batch_size=B)`` over several inputs, so that batches span inputs (noise, forward, argmax and the scatter into the
  output array, as in CERTIFY);
* **noise-only**: the same engine call with a model that does no work (returns zeros), i.e. the engine's own cost
  per sample (noise generation, ``mul_``/``add_``, argmax, scatter, Python), which bounds ``engine / bare`` at
  ``1 / (1 + bare * overhead)``;
* **ratio**: engine / bare, measured back to back in the same process (goal >= 0.90).

Allocator configurations: ``default`` (glibc's defaults) and ``tuned``
(``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295``, which stops glibc
from mapping and unmapping large activation buffers on every call); optionally ``mallopt`` (the same thresholds set
with ``mallopt`` at run time, which needs no environment variable).  The tunable must be set before the process
starts, so the script re-invokes itself once per configuration (``APPROXTUNE_BENCH_WORKER=<config>``).  Each worker
imports torch once and forks a child per measurement request, so every (model, batch size) starts from a fresh heap
with the configuration's settings, as a certification run would.  The parent sends the workers the same requests in
alternating order (A B, B A, A B, ...), so the load of other processes on the (shared) machine hits every
configuration alike.  Reported numbers are medians over rounds; ratios are medians of per-round ratios of
measurements taken back to back in one process.  Wall-clock and CPU-time throughputs are both recorded.

Usage::

    python benchmarks/bench_engine.py                 # full run (about 3-5 minutes on 2 idle cores)
    python benchmarks/bench_engine.py --quick         # short run (about a minute)
    python benchmarks/bench_engine.py --out benchmarks/engine_results   # also write engine_results.{json,md}

Torch threads are left at torch's default (recorded in the results) unless ``--threads`` is given
(``--threads default 1`` compares torch's default with one thread per process).

**Noise against the forward pass** (``--noise``; in this process, one torch thread unless ``--threads``): for the
digits CNN (1x8x8), CIFAR ResNet-20 (3x32x32) and an ImageNet ResNet-50 (3x224x224, random weights), the normals per
second the bare forward pass consumes (samples/s x numbers per sample) against what approxtune's generator
(:func:`approxtune.noise.normal_blocks`, as many 64-sample blocks in one call as the engine draws: a batch's, and at
least ``certification.NOISE_CHUNK`` numbers) and, for
reference, torch's ``randn`` with one seeded ``torch.Generator`` per block (the generator approxtune used before its
noise became bit-identical across CPUs) produce on one thread; the engine against the bare forward pass end to end;
and blocks drawn on two threads at once (numpy releases the GIL in its array loops)::

    python benchmarks/bench_engine.py --noise --out benchmarks/engine_noise_results   # about 5 minutes
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import cpu_model  # benchmarks/ is on sys.path when a script runs

TUNED_MALLOC = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"
CONFIGS = ("default", "tuned")  # compared by default
ALL_CONFIGS = ("default", "tuned", "mallopt")  # mallopt: the same two thresholds set at run time, see _mallopt
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
WORKER_ENV = "APPROXTUNE_BENCH_WORKER"
NOTES_MARKER = "<!-- notes: everything below this line is kept when the script rewrites this file -->"
SIGMA = 0.25

# Per model: input shape, batch sizes, engine workload (inputs x samples per input; samples per input deliberately not
# a multiple of the 64-sample noise block, so pieces of blocks and of inputs share batches), and repetitions of the
# (bare, engine, noise-only) triple per request.  The bare measurement runs as many forward passes as it takes to cover
# about the engine's sample count.
PLANS = {
    "full": {
        "rounds": 4,
        "models": {
            "digits-cnn": {"batches": [256, 512, 1000, 2000], "inputs": 16, "n": 1000, "reps": 3},
            "cifar_resnet20": {"batches": [256, 512, 1000, 2000], "inputs": 4, "n": 500, "reps": 1},
        },
    },
    "quick": {
        "rounds": 2,
        "models": {
            "digits-cnn": {"batches": [256, 512, 1000, 2000], "inputs": 8, "n": 1000, "reps": 1},
            "cifar_resnet20": {"batches": [256, 1000], "inputs": 2, "n": 500, "reps": 1},
        },
    },
}


# ----------------------------------------------------------------------------------------------------------------------
# worker (one per allocator configuration)


def _mallopt() -> dict:
    """Set glibc's mmap and trim thresholds from inside the process (no environment variable, no re-exec).

    ``mallopt`` takes an int, so the thresholds are 1 GiB and 2 GiB - 1 rather than 4 GiB - 1; setting either also
    switches off glibc's dynamic threshold adjustment, as the tunables do.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    return {
        "mmap_threshold": libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30)),
        "trim_threshold": libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)),
    }


def _worker(config: str, threads: int | None) -> None:
    mallopt = _mallopt() if config == "mallopt" else None  # before torch allocates anything

    import numpy as np
    import torch
    from torch import nn

    from approxtune.certification import predict_under_noise
    from approxtune.models import build_model
    from approxtune.noise import Stream, input_seeds

    if threads:
        torch.set_num_threads(threads)
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies may reach the parent's pipe

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    class NullModel(nn.Module):
        """Does no work: isolates the engine's own per-sample cost."""

        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros((x.shape[0], 10))

    def measure(name: str, batch: int, inputs: int, n: int, reps: int) -> dict:
        torch.manual_seed(0)  # the same weights in every worker
        model = build_model(name).eval()
        shape = (1, 8, 8) if name == "digits-cnn" else (3, 32, 32)
        null = NullModel().eval()
        gen = torch.Generator().manual_seed(1)
        x = torch.rand((batch, *shape), generator=gen)
        xs = torch.rand((inputs, *shape), generator=gen)
        seeds = input_seeds(0, np.arange(inputs))
        total = inputs * n
        iters = max(1, round(total / batch))

        def timed(fn, samples: int) -> tuple[float, float]:
            """(samples per wall second, samples per CPU second of the whole process)."""
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            return samples / (time.perf_counter() - w0), samples / (time.process_time() - c0)

        def bare() -> None:
            with torch.inference_mode():
                for _ in range(iters):
                    model(x).argmax(dim=1)

        def engine(m: nn.Module) -> None:
            predict_under_noise(m, xs, seeds, Stream.ESTIMATION, 0, n, SIGMA, batch_size=batch)

        # warm-up: allocator, oneDNN primitives and lazy initialisation for this batch size
        with torch.inference_mode():
            for _ in range(2):
                model(x).argmax(dim=1)
        predict_under_noise(model, xs[:1], seeds[:1], Stream.ESTIMATION, 0, min(n, 2 * batch), SIGMA, batch_size=batch)
        engine(null)

        # the batch sizes the engine actually forwards (blocks of 64 fill a batch up to >= B)
        seen: list[int] = []
        hook = null.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
        engine(null)
        hook.remove()

        out: dict[str, list[float]] = {k: [] for k in ("bare", "engine", "noise_only")}
        out.update({f"{k}_cpu": [] for k in ("bare", "engine", "noise_only")})

        def record(key: str, rates: tuple[float, float]) -> None:
            out[key].append(rates[0])
            out[f"{key}_cpu"].append(rates[1])

        for r in range(reps):  # alternate the order so that drift within a request cancels
            if r % 2 == 0:
                record("bare", timed(bare, iters * batch))
                record("engine", timed(lambda: engine(model), total))
            else:
                record("engine", timed(lambda: engine(model), total))
                record("bare", timed(bare, iters * batch))
            record("noise_only", timed(lambda: engine(null), total))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak resident set, MiB (Linux: KiB)
        return {**out, "bare_iters": iters, "engine_samples": total, "engine_batches": seen, "peak_rss_mib": rss}

    import torch as _t

    send(
        {
            "config": config,
            "pid": os.getpid(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "mallopt_ok": mallopt,
            "threads": _t.get_num_threads(),
            "interop_threads": _t.get_num_interop_threads(),
            "torch": _t.__version__,
            "numpy": np.__version__,
            "parallel_info": _t.__config__.parallel_info().splitlines()[:8],
        }
    )
    # Every request runs in a child forked from this (idle) worker, so it starts from a fresh heap with the worker's
    # allocator settings, as a certification process would: glibc's dynamic mmap/trim thresholds only ever rise, so
    # in a long-lived worker a batch size would inherit the thresholds that earlier, larger batches left behind.
    # (No OpenMP parallel region has run here yet, so forking is safe; the child creates its own thread pool.)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                send(measure(req["model"], req["batch"], req["inputs"], req["n"], req["reps"]))
            except BaseException as exc:  # report it instead of leaving the parent waiting
                send({"error": repr(exc)})
                code = 1
            finally:
                reply.flush()
                sys.stderr.flush()
                os._exit(code)
        os.waitpid(pid, 0)


# ----------------------------------------------------------------------------------------------------------------------
# parent


class Worker:
    def __init__(self, config: str, threads: int | None) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = config
        env.pop("GLIBC_TUNABLES", None)
        if config == "tuned":
            env["GLIBC_TUNABLES"] = TUNED_MALLOC
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads or "default")]
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        self.hello_config = config
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self.proc.wait()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"benchmark worker ({self.hello_config}) failed: {msg['error']}")
        return msg

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _machine() -> dict:
    cpu = cpu_model()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": load,
    }


def _configs(per_b: dict) -> list[str]:
    """The allocator configurations present in one model's summary, in canonical order."""
    present = set(next(iter(per_b.values())))
    return [c for c in ALL_CONFIGS if c in present]


def _summarise(per_c: dict[str, list[dict]]) -> dict:
    """Medians over rounds of one (model, batch size): wall-clock and CPU-time throughput, per configuration."""
    out: dict = {}
    for c, rs in per_c.items():
        row: dict = {}
        for clock, sfx in (("wall", ""), ("cpu", "_cpu")):
            ratios = [_median(r["engine" + sfx]) / _median(r["bare" + sfx]) for r in rs]  # back to back, per round
            row[clock] = {
                "bare": _median([_median(r["bare" + sfx]) for r in rs]),
                "engine": _median([_median(r["engine" + sfx]) for r in rs]),
                "noise_only": _median([_median(r["noise_only" + sfx]) for r in rs]),
                "ratio": _median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        # process CPU seconds per wall second during the bare forward (2 = both cores busy with torch's 2 threads)
        row["bare_cores_used"] = _median([_median(r["bare"]) / _median(r["bare_cpu"]) for r in rs])
        # the engine's own cost (noise, mul/add, argmax, scatter, Python), from the noise-only run's CPU time
        row["overhead_cpu_us_per_sample"] = 1e6 / row["cpu"]["noise_only"]
        batches = rs[0]["engine_batches"] if rs else []
        row["engine_mean_batch"] = sum(batches) / len(batches) if batches else None
        row["engine_batches_per_call"] = len(batches)
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs) if rs else None
        out[c] = row
    # X / default per round (the requests of a round run back to back)
    for c in per_c:
        if c == "default" or "default" not in per_c:
            continue
        for kind in ("engine", "bare"):
            out[f"{c}_over_default_{kind}"] = _median(
                [_median(t[kind]) / _median(d[kind]) for d, t in zip(per_c["default"], per_c[c], strict=True)]
            )
    return out


def run(
    plan_name: str, thread_settings: list[int | None], configs: list[str], rounds: int | None, only: list[str] | None
) -> dict:
    plan = PLANS[plan_name]
    rounds = rounds or plan["rounds"]
    models = {k: v for k, v in plan["models"].items() if not only or k in only}
    started = time.time()
    machine = _machine()  # load average at the start
    labels = {th: f"{th}" if th else "default" for th in thread_settings}
    workers = {(c, th): Worker(c, th) for th in thread_settings for c in configs}
    results: dict = {
        labels[th]: {name: {str(b): {c: [] for c in configs} for b in spec["batches"]} for name, spec in models.items()}
        for th in thread_settings
    }
    try:
        for rnd in range(rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]
            for name, spec in models.items():
                for b in spec["batches"]:
                    for th, c in ((th, c) for th in thread_settings for c in order):
                        req = {
                            "model": name,
                            "batch": b,
                            "inputs": spec["inputs"],
                            "n": spec["n"],
                            "reps": spec["reps"],
                        }
                        res = workers[c, th].ask(req)
                        res["ratio"] = _median(res["engine"]) / _median(res["bare"])
                        res["cpu_ratio"] = _median(res["engine_cpu"]) / _median(res["bare_cpu"])
                        res["round"] = rnd
                        results[labels[th]][name][str(b)][c].append(res)
                        print(
                            f"[{time.time() - started:6.1f}s] round {rnd + 1}/{rounds} {name:15s} B={b:5d} {c:7s} "
                            f"threads {workers[c, th].hello['threads']} "
                            f"bare {_median(res['bare']):9.0f}/s  engine {_median(res['engine']):9.0f}/s  "
                            f"ratio {res['ratio']:.3f}  cpu-ratio {res['cpu_ratio']:.3f}  "
                            f"noise-only {_median(res['noise_only_cpu']):9.0f}/cpu-s",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        hellos = {f"{c}/threads={labels[th]}": w.hello for (c, th), w in workers.items()}
        for w in workers.values():
            w.close()

    summary = {
        label: {name: {b: _summarise(per_c) for b, per_c in per_b.items()} for name, per_b in per_model.items()}
        for label, per_model in results.items()
    }
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    return {
        "meta": {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "plan": plan_name,
            "rounds": rounds,
            "sigma": SIGMA,
            "plan_spec": models,
            "machine": {**machine, "loadavg_end": load_end},
            "workers": hellos,
            "elapsed_s": round(time.time() - started, 1),
            "tuned_malloc": f"GLIBC_TUNABLES={TUNED_MALLOC}",
        },
        "summary": summary,
        "raw": results,
    }


def recommend(summary: dict) -> dict:
    """The (batch size, allocator) that keeps every model closest to its own best engine throughput."""
    common = None
    for per_b in summary.values():
        keys = {(b, c) for b in per_b for c in _configs(per_b)}
        common = keys if common is None else common & keys

    def eng(name: str, b: str, c: str) -> float:
        return summary[name][b][c]["wall"]["engine"]

    best = {name: max(eng(name, b, c) for b in per_b for c in _configs(per_b)) for name, per_b in summary.items()}
    scores = {(b, c): min(eng(name, b, c) / best[name] for name in summary) for b, c in sorted(common or [])}
    (b, c), score = max(scores.items(), key=lambda kv: kv[1])
    return {
        "batch_size": int(b),
        "allocator": c,
        "worst_fraction_of_best": score,
        "scores": {f"{k[0]}/{k[1]}": v for k, v in scores.items()},
    }


def _ratio(v: dict) -> str:
    return f"{v['ratio']:.2f} [{v['ratio_min']:.2f}-{v['ratio_max']:.2f}]"


def to_markdown(res: dict) -> str:
    m = res["meta"]
    mach = m["machine"]
    w = next(iter(m["workers"].values()))
    threads = ", ".join(f"{k}: {v['threads']}" for k, v in m["workers"].items())
    lines = [
        "# Engine throughput vs bare forward pass",
        "",
        "Generated by `benchmarks/bench_engine.py` (raw numbers: `engine_results.json`).",
        "",
        f"- command: `{m['command']}` ({m['plan']} plan, {m['rounds']} rounds, {m['elapsed_s']} s)",
        f"- date: {m['date']}",
        f"- machine: nproc {mach['nproc']}, CPU `{mach['cpu']}`, Python {mach['python']}, "
        f"load average at start {tuple(round(x, 2) for x in mach['loadavg_start'] or ())}, "
        f"at end {tuple(round(x, 2) for x in mach['loadavg_end'] or ())} (shared machine)",
        f"- torch {w['torch']}, numpy {w['numpy']}; `torch.get_num_threads()` per worker: {threads}",
        f"- allocator configurations: default = glibc's defaults (`GLIBC_TUNABLES` unset); tuned = "
        f"`{m['tuned_malloc']}` in the worker's environment before it starts; mallopt (if measured) = "
        f"`mallopt(M_MMAP_THRESHOLD, 1 GiB)` and `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)` called at worker start",
        f"- sigma {m['sigma']}; samples/s; median over rounds; ratio = median over rounds of engine/bare measured back "
        f"to back in one process; [min-max] of the per-round ratio in brackets",
        "",
    ]
    for label, per_model in res["summary"].items():
        nthreads = next(v["threads"] for k, v in m["workers"].items() if k.endswith(f"threads={label}"))
        lines += _model_tables(per_model, m["plan_spec"], f"torch threads {nthreads} ({label})")
        configs = _configs(next(iter(per_model.values())))
        rss = {c: max(v[c]["peak_rss_mib"] for per_b in per_model.values() for v in per_b.values()) for c in configs}
        lines += [
            f"Peak resident memory of the workers ({nthreads} threads): "
            + ", ".join(f"{c} {v:,.0f} MiB" for c, v in rss.items())
            + " (the tuned allocator never returns freed memory to the system).",
            "",
        ]
        rec = recommend(per_model)
        lines += [
            f"Automatic pick ({nthreads} threads): batch size {rec['batch_size']} with the {rec['allocator']} "
            f"allocator keeps every model at >= {rec['worst_fraction_of_best']:.0%} of its best measured (wall-clock) "
            f"engine throughput (score = worst model's fraction of its own best, over all (B, allocator) pairs "
            f"measured for both models).",
            "",
        ]
    return "\n".join(lines)


def _model_tables(per_model: dict, spec_of: dict, title: str) -> list[str]:
    lines: list[str] = []
    for name, per_b in per_model.items():
        spec = spec_of[name]
        configs = _configs(per_b)
        others = [c for c in configs if c != "default" and "default" in configs]
        lines += [
            f"## {name}, {title}",
            "",
            f"Engine workload: {spec['inputs']} inputs x n={spec['n']} samples per request, {spec['reps']} rep(s) per "
            f"request; bare: a fixed batch of B samples, as many passes as cover about the same number of samples.",
            "",
            "Wall clock (samples/s; at the mercy of other processes on the machine):",
            "",
            "| B | "
            + " | ".join(f"bare {c} | engine {c} | ratio {c}" for c in configs)
            + "".join(f" | {c}/default engine | {c}/default bare" for c in others)
            + " |",
            "|---:" * (1 + 3 * len(configs) + 2 * len(others)) + "|",
        ]
        for b, v in per_b.items():
            cells = [
                f"{v[c]['wall']['bare']:,.0f} | {v[c]['wall']['engine']:,.0f} | {_ratio(v[c]['wall'])}" for c in configs
            ]
            cells += [f"{v[f'{c}_over_default_engine']:.2f} | {v[f'{c}_over_default_bare']:.2f}" for c in others]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "CPU time (samples per CPU-second of the process, all threads; overhead = the engine's own CPU time per "
            "sample, measured with a do-nothing model; cores used = process CPU seconds per wall second in the bare "
            "forward):",
            "",
            "| B | "
            + " | ".join(f"bare {c} | engine {c} | ratio {c}" for c in configs)
            + f" | overhead µs/sample ({' / '.join(configs)}) | cores used ({' / '.join(configs)}) | engine batch |",
            "|---:" * (4 + 3 * len(configs)) + "|",
        ]
        for b, v in per_b.items():
            cells = [
                f"{v[c]['cpu']['bare']:,.0f} | {v[c]['cpu']['engine']:,.0f} | {_ratio(v[c]['cpu'])}" for c in configs
            ]
            cells.append(" / ".join(f"{v[c]['overhead_cpu_us_per_sample']:.2f}" for c in configs))
            cells.append(" / ".join(f"{v[c]['bare_cores_used']:.2f}" for c in configs))
            cells.append(f"{v[configs[0]]['engine_mean_batch']:.0f}")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write(res: dict, prefix: Path, json_too: bool = True) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if json_too:
        Path(f"{prefix}.json").write_text(json.dumps(res, indent=1) + "\n")
    md_path = Path(f"{prefix}.md")
    notes = ""
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    md_path.write_text(to_markdown(res) + "\n" + NOTES_MARKER + (notes or "\n"))


NOISE_MODELS = {  # input shape, batch size of the bare forward pass and of the engine, engine samples
    "digits-cnn": ((1, 8, 8), 512, 4096),
    "cifar_resnet20": ((3, 32, 32), 256, 1024),
    "resnet50": ((3, 224, 224), 64, 128),
}


def _clocked(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _noise_vs_forward(name: str, shape: tuple[int, ...], batch: int, samples: int, rounds: int) -> dict:
    """One model's row of :func:`noise_benchmark`."""
    import concurrent.futures

    import numpy as np
    import torch

    from approxtune.certification import NOISE_CHUNK, predict_under_noise
    from approxtune.models import build_model
    from approxtune.noise import Stream, input_seeds, normal_blocks

    torch.manual_seed(0)
    model = build_model(name).eval()
    numel = int(np.prod(shape))
    count = 64 * numel  # normals per 64-sample block
    blocks = max(batch // 64, -(-NOISE_CHUNK // count))  # the blocks the engine draws in one call
    x = torch.rand((batch, *shape))
    xs = torch.rand((max(1, samples // 1000), *shape))
    n = samples // len(xs)
    passes = max(1, samples // batch)

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(passes):
                model(x).argmax(1)

    def draw(which: np.ndarray) -> None:
        normal_blocks(input_seeds(0, which), Stream.ESTIMATION, which, count)

    def torch_randn() -> None:
        for b in range(blocks):  # the old generator: a seeded torch.Generator per block (as many blocks)
            torch.randn(count, generator=torch.Generator().manual_seed(b), dtype=torch.float32)

    def engine() -> None:
        seeds = input_seeds(1, np.arange(len(xs)))
        predict_under_noise(model, xs, seeds, Stream.ESTIMATION, 0, n, 0.25, batch_size=batch)

    pair = np.arange(max(2, blocks))  # at least one block per thread
    pool = concurrent.futures.ThreadPoolExecutor(2)  # started once, as a generating pool would be

    def two_threads() -> None:
        list(pool.map(draw, [pair[0::2], pair[1::2]]))

    bare()  # warm-up
    draw(np.arange(blocks))
    runs = {
        "bare": bare,
        "noise": lambda: draw(np.arange(blocks)),
        "one_thread_pair": lambda: draw(pair),
        "two_threads": two_threads,
        "torch_randn": torch_randn,
        "engine": engine,
    }
    rows: dict[str, list] = {k: [] for k in runs}
    two_threads()  # warm-up: the pool's threads and their generators
    for rnd in range(rounds):
        for key, fn in runs.items():
            rows[key].append(_clocked(fn))
        print(f"[noise] {name} round {rnd + 1}/{rounds}", file=sys.stderr, flush=True)
    pool.shutdown()

    def rate(key: str, units: float, clock: int) -> float:
        return units / _median([r[clock] for r in rows[key]])

    engine_samples, bare_samples = n * len(xs), passes * batch
    return {
        "shape": list(shape),
        "numbers_per_sample": numel,
        "batch": batch,
        "bare_samples_per_cpu_s": rate("bare", bare_samples, 1),
        "bare_samples_per_wall_s": rate("bare", bare_samples, 0),
        "needed_normals_per_cpu_s": rate("bare", bare_samples * numel, 1),
        "noise_normals_per_cpu_s": rate("noise", blocks * count, 1),
        "torch_randn_normals_per_cpu_s": rate("torch_randn", blocks * count, 1),
        "two_threads_over_one_wall": _median(
            [one[0] / two[0] for one, two in zip(rows["one_thread_pair"], rows["two_threads"], strict=True)]
        ),
        "engine_samples_per_cpu_s": rate("engine", engine_samples, 1),
        "engine_over_bare_cpu": _median(
            [(engine_samples / e[1]) / (bare_samples / b[1]) for e, b in zip(rows["engine"], rows["bare"], strict=True)]
        ),
        "raw": rows,
    }


def noise_benchmark(rounds: int, threads: int) -> dict:
    """Normals per second: needed by the bare forward pass, produced by the noise generator (see the module docstring).

    Every quantity is a median over ``rounds`` interleaved repetitions (CPU time of the process, wall time for the
    threads); the machine is shared, so only ratios measured side by side in one round are compared.
    """
    import numpy as np
    import torch

    from approxtune.cli import tune_malloc

    tuned = tune_malloc()  # as every approxtune command does: glibc keeps freed buffers instead of unmapping them
    torch.set_num_threads(threads)
    machine = _machine()
    models = {name: _noise_vs_forward(name, *spec, rounds) for name, spec in NOISE_MODELS.items()}
    return {
        "meta": {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "tuned_malloc": tuned,
            "machine": machine,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "models": models,
    }


def noise_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Command: `{m['command']}`; {m['date']}; {m['machine']['cpu']}, {m['machine']['nproc']} CPUs, load "
        f"{m['machine']['loadavg_start']}; torch {m['torch']} ({m['torch_threads']} thread), numpy {m['numpy']}; "
        f"allocator tuned as by the CLI: {m['tuned_malloc']}; medians of {m['rounds']} interleaved rounds, CPU time.",
        "",
        "| model (numbers per sample) | bare forward, samples/s | normals/s needed | normals/s produced (one "
        "thread) | noise share of a sample's CPU time | torch randn per block (old), normals/s | two threads / one "
        "(wall) | engine / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        need, made = r["needed_normals_per_cpu_s"], r["noise_normals_per_cpu_s"]
        lines.append(
            f"| {name} ({r['numbers_per_sample']:,}) | {r['bare_samples_per_cpu_s']:,.1f} | {need / 1e6:,.2f} M | "
            f"{made / 1e6:,.1f} M | {need / (need + made):.1%} | {r['torch_randn_normals_per_cpu_s'] / 1e6:,.1f} M | "
            f"{r['two_threads_over_one_wall']:.2f} | "
            f"{r['engine_over_bare_cpu']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (about a minute)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md (e.g. benchmarks/engine_results)")
    ap.add_argument(
        "--threads",
        nargs="+",
        default=["default"],
        help="torch thread settings to compare: 'default' (torch's default) or a number, e.g. --threads default 1",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=ALL_CONFIGS,
        help="allocator configurations to compare (default: default tuned); mallopt sets the thresholds at run time",
    )
    ap.add_argument("--render", type=Path, help="only rewrite the markdown from a results .json (with --out)")
    ap.add_argument("--rounds", type=int, help="override the plan's number of rounds")
    ap.add_argument("--models", nargs="+", help="only these models (digits-cnn, cifar_resnet20)")
    ap.add_argument("--noise", action="store_true", help="noise generation against the forward pass (see above)")
    args = ap.parse_args()
    settings = [None if t == "default" else int(t) for t in args.threads]
    if args.noise:
        res = noise_benchmark(args.rounds or 3, settings[0] or 1)
        print(noise_markdown(res))
        if args.out:
            Path(f"{args.out}.json").write_text(json.dumps(res, indent=1) + "\n")
            print(f"wrote {args.out}.json", file=sys.stderr)
        return
    config = os.environ.get(WORKER_ENV)
    if config:
        _worker(config, settings[0])
        return
    if args.render:
        res = json.loads(args.render.read_text())
        if args.out:
            write(res, args.out, json_too=False)
        print(to_markdown(res))
        return
    res = run("quick" if args.quick else "full", settings, args.configs, args.rounds, args.models)
    md = to_markdown(res)
    print(md)
    if args.out:
        write(res, args.out)
        print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
