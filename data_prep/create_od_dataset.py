"""`python data_prep/create_od_dataset.py`: the detection converter, kept at its documented place;
the program is `pg_finetune.prep.od_dataset` (also installed as `pg-make-od-dataset`)."""

import sys

from pg_finetune.prep.od_dataset import main

if __name__ == "__main__":
    sys.exit(main())
