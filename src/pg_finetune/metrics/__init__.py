"""Metrics shared by training-time eval (`pg_finetune.tasks`) and the eval suite (`eval/`).

- `vqa`: the official VQA accuracy (answer normalisation, leave-one-out min(#humans / 3, 1));
- `captions`: CIDEr-D, BLEU-4, ROUGE-L via pycocoevalcap, PTB tokenizer when java is present;
- `boxes`: IoU, Hungarian matching, accuracy at an IoU threshold, COCO mAP via pycocotools;
- `counting`: counting accuracy, overall and per class.

Each module imports its heavy dependency (pycocoevalcap, pycocotools) only when called.
"""
