"""`python data_prep/create_vqa_dataset.py`: the VQA-family converter (TextVQA, DocVQA, ChartQA, AI2D, ScienceQA
-> JSONL); the program is `pg_finetune.prep.vqa_dataset` (also installed as `pg-make-vqa-dataset`)."""

import sys

from pg_finetune.prep.vqa_dataset import main

if __name__ == "__main__":
    sys.exit(main())
