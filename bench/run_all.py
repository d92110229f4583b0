"""Run every benchmark under bench/ in turn: `make bench` or `python bench/run_all.py`.

Each benchmark prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["train_throughput.py"]

if __name__ == "__main__":
    here = Path(__file__).parent
    for name in BENCHMARKS:
        print(f"== {name}")
        subprocess.run([sys.executable, str(here / name), *sys.argv[1:]], check=True)
