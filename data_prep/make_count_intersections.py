"""`python data_prep/make_count_intersections.py`: the counting-set maker, kept at its documented place;
the program is `pg_finetune.prep.count_intersections` (also installed as `pg-make-count-intersections`)."""

import sys

from pg_finetune.prep.count_intersections import main

if __name__ == "__main__":
    sys.exit(main())
