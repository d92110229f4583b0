"""Every training / inference path of the real CLIs on a random-weight 3B PaliGemma, on CPU, with peak memory.

    python bench/real_size.py                                   # paligemma-3b-pt-224, every stage
    python bench/real_size.py --config paligemma2-3b-pt-224 --stages lora,qlora
    python bench/real_size.py --stages lora --steps 2           # one stage

Nothing is mocked: the model is `pg_finetune.real_size`'s bf16 checkpoint, and each stage runs a
real CLI (`python -m pg_finetune.train`, `pg_finetune.evaluate`, `pg_finetune.predict`) in its own
process, at batch 1 for a few steps on built-in easy-VQA data. The child runs under a thin watcher
(`--child`): a thread samples the process's RSS from /proc/self/status every 0.1 s, and wrappers
around `load_model`, `Trainer.training_step`, `Trainer._save_checkpoint` / `save_model`,
`merge_lora` / `merge_adapter_into_base` and `generate` timestamp the stages, so the peak RSS of
each stage (load, first step, steady step, save, merge, generate) can be read off the samples.
At the steady step it also records parameter and optimizer-state bytes; activations + temporaries
= the step's peak RSS - its starting RSS.

Stages: lora (bf16 LoRA + merge_lora), qlora (4-bit NF4 via bitsandbytes on CPU), attention_only,
resume (SIGKILL after the first checkpoint, then the same command again), evaluate and predict
(on lora's final adapter). Results: bench/results/real_size.json and a printed table. On 2 cores a
stage takes minutes; the 3B model needs 6-8 GB of RAM per process, so stages run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
RECIPES = {"lora": "recipes/tiny/easyvqa_lora.yaml", "qlora": "recipes/tiny/easyvqa_qlora.yaml",
           "attention_only": "recipes/tiny/easyvqa_attention_only.yaml"}
STAGES = ("lora", "qlora", "attention_only", "resume", "evaluate", "predict")


# ----------------------------------------------------------------------------------------- the watcher
def _rss_bytes() -> tuple[int, int, int]:
    """(VmRSS, VmHWM, RssAnon) in bytes. RSS - RssAnon is file-backed: mmapped safetensors weights."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0), values.get("RssAnon", 0)


def child(out: str, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` in this process with RSS sampling and stage marks; write JSON to `out`."""
    import atexit
    import runpy

    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []
    info: dict = {}
    stop = threading.Event()

    def sample():
        last_dump = time.monotonic()
        while not stop.is_set():
            rss, _, anon = _rss_bytes()
            samples.append((time.monotonic(), rss, anon))
            if time.monotonic() - last_dump > 10:  # a SIGKILLed run keeps what it measured
                last_dump = time.monotonic()
                write()
            stop.wait(0.1)

    def mark(label: str) -> None:
        marks.append((time.monotonic(), label))
        if label == "load:start":
            info.setdefault("runtime_bytes", _rss_bytes()[0])  # Python + torch + data, before the model
        if os.environ.get("PG_MEMWATCH_ECHO"):
            print(f"[memwatch] {label} rss={_rss_bytes()[0] / GiB:.2f} GiB", file=sys.stderr, flush=True)

    def wrap(owner, name: str, label: str, after=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            mark(f"{label}:start")
            result = original(*args, **kwargs)
            mark(f"{label}:end")
            if after:
                after(args, result)
            return result

        setattr(owner, name, wrapper)

    def write():
        info["vmhwm"] = _rss_bytes()[1]
        tmp = Path(out + ".tmp")
        tmp.write_text(json.dumps({"samples": list(samples), "marks": list(marks), "info": dict(info)}))
        tmp.replace(out)

    def dump():
        stop.set()
        write()

    def record_state(args, _result):
        trainer, inputs = args[0], args[2]
        info["seq_len"] = max(info.get("seq_len", 0), int(inputs["input_ids"].shape[1]))
        info["label_tokens"] = max(info.get("label_tokens", 0), int((inputs["labels"] != -100).sum()))
        if info.get("steps", 0) == 1:  # after the 2nd step: the optimizer state exists
            info["param_bytes"] = _tensor_bytes(trainer.model.parameters())
            info["optimizer_bytes"] = _tensor_bytes(
                t for state in trainer.optimizer.state.values() for t in state.values() if hasattr(t, "element_size"))
        info["steps"] = info.get("steps", 0) + 1

    import transformers
    from transformers.generation.utils import GenerationMixin

    import pg_finetune.model as model_module
    import pg_finetune.tuning as tuning_module

    wrap(model_module, "load_model", "load")
    wrap(transformers.Trainer, "training_step", "step", after=record_state)
    wrap(transformers.Trainer, "_save_checkpoint", "checkpoint")
    wrap(transformers.Trainer, "save_model", "save")
    wrap(tuning_module, "merge_lora", "merge")
    wrap(tuning_module, "merge_adapter_into_base", "merge")
    wrap(GenerationMixin, "generate", "generate")
    threading.Thread(target=sample, daemon=True).start()
    atexit.register(dump)
    mark("process:start")
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        mark("process:end")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- analysis
def stage_peaks(record: dict) -> dict:
    """Peak RSS (GiB) per stage from the samples and marks of one child run."""
    samples, marks = record["samples"], record["marks"]

    def peak(t0: float, t1: float) -> float | None:
        values = [s[1] for s in samples if t0 <= s[0] <= t1]
        return round(max(values) / GiB, 2) if values else None

    def spans(label: str) -> list[tuple[float, float]]:
        starts = [t for t, m in marks if m == f"{label}:start"]
        ends = [t for t, m in marks if m == f"{label}:end"]
        return list(zip(starts, ends, strict=False))  # a killed step has no end

    result: dict = {}
    for label in ("load", "save", "checkpoint", "merge"):
        if spans(label):
            result[label] = max(peak(*s) or 0 for s in spans(label))
    steps = spans("step")
    # a step's optimizer update runs after training_step returns: a step lasts until the next mark
    later = sorted(t for t, m in marks if not m.startswith("step:"))
    bounds = []
    for i, (t0, _) in enumerate(steps):
        nxt = steps[i + 1][0] if i + 1 < len(steps) else min([t for t in later if t > t0] or [float("inf")])
        bounds.append((t0, nxt))
    if bounds:
        result["first_step"] = peak(*bounds[0])
        if len(bounds) > 1:
            result["steady_step"] = max(peak(*b) or 0 for b in bounds[1:])
            start_rss = [s[1] for s in samples if s[0] >= bounds[1][0]][:1]
            if start_rss and result["steady_step"]:
                result["steady_step_start"] = round(start_rss[0] / GiB, 2)
        result["step_s"] = [round(t1 - t0, 1) for t0, t1 in steps]
    gens = spans("generate")
    if gens:
        result["generate"] = max(peak(*s) or 0 for s in gens)
    if samples and len(samples[0]) > 2:
        top = max(samples, key=lambda s: s[1])
        result["peak_anon"] = round(top[2] / GiB, 2)  # at the RSS peak; the rest is mapped weight files
    info = record["info"]
    result["vmhwm"] = round(info.get("vmhwm", 0) / GiB, 2)
    for key in ("param_bytes", "optimizer_bytes", "runtime_bytes"):
        if key in info:
            result[key.replace("_bytes", "_gib")] = round(info[key] / GiB, 3)
    for key in ("seq_len", "label_tokens"):
        if key in info:
            result[key] = info[key]
    return result


def estimate_for(row: dict, config_name: str) -> dict:
    """bench/gpu_3b.py's analytic estimate for a measured training row, the measured runtime as overhead."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_3b

    from pg_finetune.real_size import CONFIGS
    from pg_finetune.recipe import load_recipe

    family, image_size = CONFIGS[config_name]
    config = gpu_3b.paligemma_config("paligemma" if family == "gemma" else "paligemma2", image_size)
    method = "lora" if row["stage"].startswith("resume") else row["stage"]
    recipe = load_recipe(ROOT / RECIPES[method])  # what the stage trained with (train_args overrides neither)
    est = gpu_3b.estimate_memory(config, method, 1, row["seq_len"], loss_positions=row["label_tokens"],
                                 lora_r=recipe.tuning.lora_r, lora_dropout=recipe.tuning.lora_dropout,
                                 autocast=recipe.training.bf16, device="cpu", overhead=row.get("runtime_gib", 0) * GiB)
    out = {k: round(v / GiB, 2) for k, v in vars(est).items()}
    out["total"] = round(est.total / GiB, 2)
    measured = row.get("steady_step")
    if measured:
        out["measured_over_estimate"] = round(measured / out["total"], 3)
    return out


def run_child(name: str, module: str, argv: list[str], work: Path, kill_when=None, config_name: str = "") -> dict:
    """Run one CLI under the watcher; `kill_when(log_path)` -> True sends SIGKILL (the resume stage)."""
    out, log = work / f"{name}.mem.json", work / f"{name}.log"
    out.unlink(missing_ok=True)
    cmd = ["nice", "-n", "10", sys.executable, __file__, "--child", str(out), module, *argv]
    print(f"--- {name}: {' '.join(cmd[4:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PG_MEMWATCH_ECHO": "1", "TOKENIZERS_PARALLELISM": "false"})
        killed = False
        while proc.poll() is None:
            time.sleep(1)
            if kill_when and not killed and kill_when():
                os.kill(proc.pid, signal.SIGKILL)  # our own child, by pid
                killed = True
        rc = proc.wait()
    row = dict(stage=name, rc=rc, wall_s=round(time.perf_counter() - start, 1), killed=killed, log=str(log))
    if out.exists():
        row.update(stage_peaks(json.loads(out.read_text())))
    print(f"    rc={rc} wall={row['wall_s']} s " + " ".join(f"{k}={v}" for k, v in row.items()
                                                          if k not in ("stage", "rc", "wall_s", "log")), flush=True)
    if name in RECIPES and row.get("seq_len"):
        row["estimate_gib"] = estimate_for(row, config_name)
        print(f"    estimate (gpu_3b.estimate_memory, runtime as overhead): {row['estimate_gib']}", flush=True)
    if rc != 0 and not killed:
        print("    " + "\n    ".join(log.read_text().splitlines()[-15:]), flush=True)
    return row


def train_args(stage: str, model_dir: Path, runs: Path, steps: int, extra: list[str]) -> list[str]:
    method = "lora" if stage == "resume" else stage
    return ["--recipe", RECIPES[method],
            f"name=real_size_{stage}", f"model.name_or_path={model_dir}", "model.dtype=bfloat16",
            f"training.output_dir={runs / stage}", f"training.max_steps={steps}",
            "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=1",
            "training.logging_steps=1", f"training.save_steps={1 if stage == 'resume' else steps}",
            "data.train_split=train[:16]", "data.eval_split=test[:2]", "eval.max_samples=2",
            "eval.batch_size=1", "eval.max_new_tokens=4", "eval.before_and_after=false",
            "logging.html_report=false",
            *(["training.merge_lora=true"] if stage == "lora" else []),
            *(["tuning.bnb_4bit_compute_dtype=bfloat16"] if stage == "qlora" else []), *extra]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paligemma-3b-pt-224", help="a pg_finetune.real_size config name")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training stage (batch 1)")
    parser.add_argument("--work", default="runs/real_size", help="run directories and logs")
    parser.add_argument("--out", default="bench/results/real_size.json")
    parser.add_argument("extra", nargs="*", help="extra recipe overrides for every training stage")
    args = parser.parse_args(argv)
    from pg_finetune.real_size import is_complete, save_real_size

    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    work = (ROOT / args.work / args.config).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    from pg_finetune.real_size import default_dir

    model_dir = default_dir(args.config)
    if not is_complete(model_dir):
        rows.append(run_child("make", "pg_finetune.real_size", ["--config", args.config], work))
    save_real_size(args.config)  # no-op when complete; raises if the child failed
    runs = work / "runs"
    for stage in stages:
        if stage in RECIPES:
            rows.append(run_child(stage, "pg_finetune.train",
                                  train_args(stage, model_dir, runs, args.steps, args.extra), work,
                                  config_name=args.config))
        elif stage == "resume":
            ckpt = runs / "resume" / "checkpoint-1"
            first = run_child("resume_killed", "pg_finetune.train",
                              train_args(stage, model_dir, runs, args.steps, args.extra), work,
                              kill_when=ckpt.is_dir)
            rows.append(first)
            second = run_child("resume", "pg_finetune.train",
                               train_args(stage, model_dir, runs, args.steps, args.extra), work)
            second["resumed_from_checkpoint"] = "resuming from" in Path(second["log"]).read_text() and \
                "checkpoint-" in Path(second["log"]).read_text()
            rows.append(second)
        elif stage == "evaluate":
            rows.append(run_child("evaluate", "pg_finetune.evaluate",
                                  ["--model", str(model_dir), "--adapter", str(runs / "lora" / "final"),
                                   "--benchmark", "easyvqa", "--limit", "2", "--max-new-tokens", "4", "--batch-size", "1", "--dtype", "bfloat16",
                                   "--out", str(work / "evaluate")], work))
        elif stage == "predict":
            rows.append(run_child("predict", "pg_finetune.predict",
                                  ["--model", str(runs / "lora" / "merged"), "--image", str(_an_image(work)),
                                   "--prompt", "answer en what color is the shape?", "--max-new-tokens", "4",
                                   "--dtype", "bfloat16", "--out", str(work / "predict.jsonl")], work))
    result = dict(config=args.config, steps=args.steps, date=time.strftime("%Y-%m-%d %H:%M"),
                  cores=os.cpu_count(), rows=rows)
    out = ROOT / args.out
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.config] = result
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"\n{'stage':<16}{'rc':>4}{'wall s':>8}{'load':>7}{'step1':>7}{'steady':>8}{'save':>7}{'merge':>7}"
          f"{'gen':>7}{'HWM':>7}{'params':>8}{'optim':>7}  (GiB RSS)")
    for r in rows:
        cells = [r.get(k) for k in ("load", "first_step", "steady_step", "save", "merge", "generate", "vmhwm",
                                    "param_gib", "optimizer_gib")]
        print(f"{r['stage']:<16}{r['rc']:>4}{r['wall_s']:>8}" + "".join(
            f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (7, 7, 8, 7, 7, 7, 7, 8, 7), strict=True)))
    print(f"wrote {out}")
    return 0 if all(r["rc"] == 0 or r["killed"] for r in rows) else 1


def _an_image(work: Path) -> Path:
    from PIL import Image

    path = work / "shape.png"
    if not path.exists():
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        image.paste((200, 30, 30), (16, 16, 48, 48))
        image.save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
