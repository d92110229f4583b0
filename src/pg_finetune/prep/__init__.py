"""Dataset makers: `od_dataset` (COCO / YOLO / VOC / datasets detection data -> PaliGemma JSONL,
`pg-make-od-dataset`) and `count_intersections` (the line-intersection counting set,
`pg-make-count-intersections`); `python data_prep/<script>.py` runs the same programs."""
