"""`python data_prep/create_seg_dataset.py`: the segmentation converter (COCO masks, RefCOCO refs -> JSONL);
the program is `pg_finetune.prep.seg_dataset` (also installed as `pg-make-seg-dataset`)."""

import sys

from pg_finetune.prep.seg_dataset import main

if __name__ == "__main__":
    sys.exit(main())
