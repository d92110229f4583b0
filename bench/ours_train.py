"""`python -m pg_finetune.train` with a step clock, for the process-level benchmarks.

    python bench/ours_train.py --recipe recipes/tiny/easyvqa_lora.yaml training.max_steps=200 ...

Runs `pg_finetune.train.main(argv)` unchanged plus a callback that notes when the first optimiser step
ends, then prints a `BENCH {json}` line (first step's wall-clock end, the run's samples/s from its
metrics.json, whether bitsandbytes was imported) for bench/startup.py and bench/train_throughput.py.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepClock, report  # noqa: E402


def main() -> int:
    from pg_finetune.train import main as train_main

    argv = sys.argv[1:]
    clock = StepClock()
    code = train_main(argv, callbacks=[clock])
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("training.output_dir="))
    metrics = json.loads((Path(out) / "metrics.json").read_text()) if code == 0 else {}
    report(code=code, first_step_end=clock.first_step_end, samples_per_s=metrics.get("train_samples_per_second"),
           imported_bitsandbytes="bitsandbytes" in sys.modules, end=time.time())
    return code


if __name__ == "__main__":
    sys.exit(main())
