"""Wall time of one entry point's process, launched plainly and through ``toollmm.cli.run``
(the garbage collector kept off what lives until exit), the two alternating.

    python bench/startup_bench.py --runs 3 toollmm.cli.inference --ckpt ckpt/tiny/final --split test \\
        inference.constrained=true --output /tmp/startup_bench.json

Each run is a new Python process, timed from launch to exit; the medians are printed last.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

LAUNCHERS = {
    "plain": "import importlib, sys; importlib.import_module(sys.argv.pop(1)).main()",
    "toollmm.cli.run": "import sys; from toollmm.cli import run; run(sys.argv.pop(1))",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each launcher")
    parser.add_argument("module", help="the entry module, e.g. toollmm.cli.inference")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its command-line arguments")
    args = parser.parse_args()
    seconds = {name: [] for name in LAUNCHERS}
    for run in range(args.runs):
        for name, code in LAUNCHERS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, args.module, *args.args], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds[name].append(time.perf_counter() - start)
            print(f"run {run + 1} {name:16} {seconds[name][-1]:.2f} s", flush=True)
    for name, values in seconds.items():
        print(f"{name:16} median {statistics.median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    main()
