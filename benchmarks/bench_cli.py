"""Start-up of the command line: `approxtune front` on a tuned study, `approxtune --help`, and what they import.

    python benchmarks/bench_cli.py --study studies/digits.toml     # after `approxtune tune studies/digits.toml`

Each command runs ``--repeats`` times in a fresh process, side by side in one loop (so machine noise hits all alike);
the results file keeps the median and the spread of the wall times, and which heavy modules each command imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_model

HEAVY = ("torch", "onnx", "onnxruntime", "scipy.stats", "optuna_dashboard", "matplotlib")
PROBE = f"""
import sys
from approxtune.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:  # --help
    code = exit.code
print("imported", [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"approxtune {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1]}")
    return seconds, done.stderr.strip().splitlines()[-1].removeprefix("imported ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits.toml", help="a tuned study file")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).with_name("cli_results")))
    args = parser.parse_args()
    commands = {
        "front": ["-q", "front", args.study],
        "--help": ["--help"],
        "front --json": ["front", "--json", args.study],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    imported: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, argv in commands.items():
            seconds, modules = run(argv)
            times[name].append(seconds)
            imported[name] = modules
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    machine = f"{platform.machine()}, {cpu_model()}, Python {platform.python_version()}, load average {load} at the end"
    results = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "heavy_imports": imported[name]}
        for name, t in times.items()
    }
    Path(args.out + ".json").write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    lines = [
        "# Command-line start-up",
        "",
        f"Machine: {machine}; shared with other work, so medians over {args.repeats} fresh processes per command,",
        "the commands interleaved in one loop.",
        "",
        f"Command: `python benchmarks/bench_cli.py --study {args.study} --repeats {args.repeats}` (the study tuned",
        "first with `approxtune tune`).",
        "",
        "| command | median s | min s | max s | heavy modules imported |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        spread = f"{r['min_s']:.2f} | {r['max_s']:.2f}"
        lines.append(f"| `approxtune {name}` | {r['median_s']:.2f} | {spread} | {r['heavy_imports']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
