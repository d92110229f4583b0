"""Evaluation suite: `python -m eval.run --benchmark NAME ...` (see eval/run.py)."""
