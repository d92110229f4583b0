"""Images per second of the data_prep scripts.

    python bench/data_prep_throughput.py [--num 300] [--repeats 3]

- `create_od_dataset.py --format coco` on a synthetic COCO set of `--num` JPEGs
  (320x240, 1-4 boxes each, about one extra box in ten marked crowd) written to a temp dir first;
  run as pointing at the images and with `--copy-images`;
- `make_count_intersections.py` generating `--num` balanced 384 px samples (PNG).

Each figure is the median of `--repeats` runs into fresh temp dirs. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pg_finetune.prep import count_intersections as make_count_intersections  # noqa: E402
from pg_finetune.prep import od_dataset as create_od_dataset  # noqa: E402

CLASSES = ["cat", "dog", "car", "person"]


def write_synthetic_coco(root: Path, num: int, seed: int = 0) -> tuple[Path, Path]:
    """`num` JPEGs under root/images and a COCO instances JSON describing them."""
    rng = random.Random(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num):
        width, height = 320, 240
        name = f"{i:06d}.jpg"
        color = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (width, height), color).save(images_dir / name, quality=90)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for k in range(rng.randint(1, 4)):
            x, y = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            w, h = rng.uniform(5, width - x), rng.uniform(5, height - y)
            annotations.append({
                "id": len(annotations), "image_id": i, "category_id": rng.randint(1, len(CLASSES)),
                "bbox": [x, y, w, h], "iscrowd": int(k > 0 and rng.random() < 0.1), "area": w * h,
            })
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, images_dir


def time_od(num: int, copy_images: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        annotations, images_dir = write_synthetic_coco(Path(tmp) / "coco", num)
        argv = ["--format", "coco", "--annotations", str(annotations), "--images", str(images_dir),
                "--out", str(Path(tmp) / "out"), "--quiet"] + (["--copy-images"] if copy_images else [])
        start = time.perf_counter()
        rc = create_od_dataset.main(argv)
        elapsed = time.perf_counter() - start
        lines = (Path(tmp) / "out" / "train.jsonl").read_text().splitlines()
        if rc != 0 or len(lines) != num:
            raise RuntimeError(f"create_od_dataset returned {rc} and wrote {len(lines)} of {num} images")
    return elapsed


def time_count(num: int, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = make_count_intersections.generate(Path(tmp), num, seed=seed, progress=False)
        elapsed = time.perf_counter() - start
        if sum(summary["per_class"].values()) != num:
            raise RuntimeError(f"make_count_intersections wrote {summary['per_class']}, expected {num}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    jobs = {
        "create_od_dataset coco": lambda r: time_od(args.num, copy_images=False),
        "create_od_dataset coco --copy-images": lambda r: time_od(args.num, copy_images=True),
        "make_count_intersections": lambda r: time_count(args.num, seed=r),
    }
    rows = []
    for name, job in jobs.items():
        times = [job(r) for r in range(args.repeats)]
        median = statistics.median(times)
        rows.append({"job": name, "num": args.num, "median_s": median, "images_per_s": args.num / median})
    print(f"\n{'job':<40}{'images/s':>10}")
    for row in rows:
        print(f"{row['job']:<40}{row['images_per_s']:>10.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), python=platform.python_version(),
                num=args.num, repeats=args.repeats, statistic="median wall time")
    path = out / "data_prep_throughput.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
