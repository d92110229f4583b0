"""`python -m eval.run`: the evaluation CLI, kept at its documented place; the program is
`pg_finetune.evaluate` (also installed as `pg-eval`).

    python -m eval.run --benchmark easyvqa --model runs/tiny_easyvqa_full/final --limit 500
"""

from __future__ import annotations

import sys

from pg_finetune.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m eval.run"))
