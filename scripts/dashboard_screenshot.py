"""Screenshot a trial's page in optuna-dashboard with headless Chromium: what a user sees of a study, in a real browser.

    python scripts/dashboard_screenshot.py sqlite:///runs/digits-sigma0.5/study.db \\
        --artifact-dir runs/digits-sigma0.5/artifacts --trial 3 --out dashboard-trial3.png

Starts ``optuna-dashboard STORAGE --artifact-dir DIR`` on a free local port, loads
``/dashboard/studies/<id>/trials?numbers=<trial>`` in Chromium (Debian: ``apt-get install chromium``) with a fresh
profile and no network features, and writes the rendered page as a PNG.  Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage", help="the study storage URL, e.g. sqlite:///runs/digits-sigma0.5/study.db")
    parser.add_argument("--artifact-dir", help="the study's artifact store (<output_dir>/artifacts)")
    parser.add_argument("--study-id", type=int, default=1, help="the study's id in the storage (default: 1)")
    parser.add_argument("--trial", type=int, default=0, help="the trial number whose page to show (default: 0)")
    parser.add_argument("--out", default="dashboard.png", help="where to write the screenshot")
    parser.add_argument("--size", default="1500,2200", help="window size in pixels, WIDTH,HEIGHT")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the Chromium binary")
    args = parser.parse_args(argv)

    port = free_port()
    command = ["optuna-dashboard", args.storage, "--host", "127.0.0.1", "--port", str(port)]
    if args.artifact_dir:
        command += ["--artifact-dir", args.artifact_dir]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/studies")
        url = f"{base}/dashboard/studies/{args.study_id}/trials?numbers={args.trial}"
        out = Path(args.out).resolve()
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    args.chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=15000",
                    f"--screenshot={out}",
                    url,
                ],
                check=True,
                timeout=180,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        print(f"{url} -> {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
