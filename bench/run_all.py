"""Run every CPU benchmark under bench/ in turn: `make bench` or `python bench/run_all.py [--quick]`.

Each benchmark prints a table and writes JSON under bench/results/ (or --out). gpu_3b.py runs in
--estimate mode here (analytic counts); on a GPU machine run `python bench/gpu_3b.py` itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "train_throughput.py": [],
    "startup.py": [],
    "ceiling.py": [],
    "generation_throughput.py": [],
    "data_prep_throughput.py": [],
    "gpu_3b.py": ["--estimate"],
}
QUICK = {
    "train_throughput.py": ["--rounds", "1", "--steps", "10", "--methods", "lora", "--data", "distinct"],
    "startup.py": ["--rounds", "1", "--methods", "lora", "--prompts", "16"],
    "ceiling.py": ["--rounds", "1", "--steps", "10", "--methods", "lora", "--prompts", "16"],
    "generation_throughput.py": ["--num", "32", "--repeats", "1"],
    "data_prep_throughput.py": ["--num", "60", "--repeats", "1"],
    "gpu_3b.py": [],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few steps: checks that each benchmark runs")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    here = Path(__file__).parent
    for name, extra in BENCHMARKS.items():
        print(f"== {name}", flush=True)
        quick = QUICK[name] if args.quick else []
        subprocess.run([sys.executable, str(here / name), *extra, *quick, "--out", args.out], check=True)
