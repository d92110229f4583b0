"""Invariants (STYLE.md item 11): the global batch, not how it is split, decides the update.

1. Two gloo CPU processes x batch 4 == one process x batch 8 (same final weights, same train_loss),
   and only the main process writes (the output directory looks exactly like a one-process run's).
2. One process: batch 8 x accumulation 1 == batch 2 x accumulation 4.
3. (slow) 1. again with big_vision's per-example loss (training.loss_normalization=example); its
   accumulation variant is tests/test_loss_options.py.

Why the example order matches without touching train.py (transformers 5.23, accelerate 1.15):
the Trainer builds a plain `RandomSampler` (train_sampling_strategy="random"); accelerate's
`prepare_data_loader` swaps it for a `SeedableRandomSampler` seeded with `data_seed` (train.py passes
training.seed) in ONE and in TWO processes alike (`use_seedable_sampler` defaults to True), so the
permutation is the same. With two processes and `split_batches=False` it then wraps the batch sampler in a
`BatchSamplerShard`: rank r takes batches r, r+2, ... of size 4, so optimiser step k sees
perm[8k:8k+8] split 4+4, which is exactly the one-process batch of 8 (and the 4 micro-batches of 2).

Why the loss matches: PaliGemma's forward takes **kwargs, so the Trainer passes `num_items_in_batch`
(label tokens of the whole global batch: summed over accumulation steps and, with
average_tokens_across_devices=True by default, gathered over ranks); the loss is a token sum divided by
that count (times world size, undoing DDP's gradient mean), so padding and uneven answer lengths per
micro-batch do not change the gradient.

Caveat found while writing this: `TrainOutput.training_loss` adds the *local* (rank-0) loss of the steps
after the last logging step; only logged steps are all-gathered. So these runs log every step
(logging_steps=1); with logging_steps not dividing max_steps, a DDP run's metrics.json train_loss is rank 0's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PaliGemmaForConditionalGeneration

from pg_finetune.model import resolve_model_path
from pg_finetune.train import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/tiny/easyvqa_full.yaml")
GLOBAL_BATCH = 8
STEPS = 4

# float32 everywhere. The splits only change the summation order (per-micro-batch token sums, the gloo
# all-reduce of gradients, matmuls over a batch of 4 vs 8, padding to a different longest sequence), ~1e-7
# relative per op. Measured on this setup (4 Adam steps, lr 1e-3): max |weight difference| 4.9e-7 for DDP
# and 1.2e-6 for accumulation, train_loss equal to ~1e-8 relative. A real bug is orders of magnitude larger:
# another data order (training.seed=43) moves some weight by 5e-3, one optimiser step fewer by 6.6e-4.
# rtol 1e-4 / atol 1e-5 sits between the two with ~10x margin on both sides.
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)
LOSS_TOL = dict(rel=1e-4, abs=1e-5)


def _overrides(out: Path, batch: int, accumulation: int = 1) -> list[str]:
    return [
        f"training.output_dir={out}",
        "data.train_split=train[:64]",
        "data.eval_split=null",
        "eval.before_and_after=false",
        f"training.max_steps={STEPS}",
        f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accumulation}",
        "training.logging_steps=1",  # every step's loss is all-gathered (see the module docstring)
        "training.save_steps=2",  # a checkpoint mid-run too: must be written once, by rank 0
        "training.save_total_limit=null",
        "training.warmup_ratio=0.0",
        "training.dataloader_num_workers=0",
        "training.use_cpu=true",  # gloo on CPU even where a GPU exists
    ]


def _one_process(out: Path, batch: int, accumulation: int = 1, extra: tuple[str, ...] = ()) -> Path:
    assert main(["--recipe", RECIPE, *_overrides(out, batch, accumulation), *extra]) == 0
    return out


def _two_processes(out: Path, batch: int, extra: tuple[str, ...] = ()) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # two gloo CPU processes even on a GPU machine
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pg_finetune.train", "--recipe", RECIPE, *_overrides(out, batch), *extra,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _loss(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["train_loss"]


def _assert_same_training(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], **WEIGHT_TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert _loss(a) == pytest.approx(_loss(b), **LOSS_TOL)


def _listing(run: Path) -> list[str]:
    """Every path under the run, with the per-rank RNG states (by design one per process) set aside."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.name.startswith("rng_state"))


@pytest.fixture(scope="module")
def batch8(tmp_path_factory) -> Path:
    run = _one_process(tmp_path_factory.mktemp("b8") / "run", GLOBAL_BATCH)
    assert _loss(run) > 0 and json.loads((run / "metrics.json").read_text())["steps"] == STEPS
    return run


def test_training_moved_the_weights(batch8):
    base = PaliGemmaForConditionalGeneration.from_pretrained(resolve_model_path("tiny")).state_dict()
    trained = PaliGemmaForConditionalGeneration.from_pretrained(batch8 / "final").state_dict()
    assert trained.keys() == base.keys()
    moved = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert moved  # the comparisons below are not between two untouched copies of the base model


def test_two_ddp_processes_equal_one_process(batch8, tmp_path):
    ddp = _two_processes(tmp_path / "run", GLOBAL_BATCH // 2)
    _assert_same_training(ddp, batch8)
    # only rank 0 wrote: one metrics.json, one final/, the same checkpoints and files as one process
    assert _listing(ddp) == _listing(batch8)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # the Trainer saves each rank's RNG state, by design
        per_rank = sorted(p.name for p in (ddp / checkpoint).glob("rng_state*"))
        assert per_rank == ["rng_state_0.pth", "rng_state_1.pth"]
        assert [p.name for p in (batch8 / checkpoint).glob("rng_state*")] == ["rng_state.pth"]
    assert [p.name for p in ddp.rglob("metrics.json")] == ["metrics.json"]
    assert sorted(p.name for p in ddp.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4", "final", "report_files"]


def test_batch_8_equals_batch_2_times_accumulation_4(batch8, tmp_path):
    accumulated = _one_process(tmp_path / "run", 2, accumulation=4)
    _assert_same_training(accumulated, batch8)
    assert _listing(accumulated) == _listing(batch8)


# big_vision's per-example loss: the example count, like the token count, is summed over the ranks
# (PaliGemmaTrainer._get_num_items_in_batch). Plain SGD without clipping, so that a count off by the
# world size (a step twice as long) shows; Adam's first steps would hide it. Slow: two runs, ~90 s here.
PER_EXAMPLE = (
    "training.loss_normalization=example", "training.label_smoothing=0.1",
    "training.optim=sgd", "training.learning_rate=0.5", "training.max_grad_norm=0",
)


@pytest.mark.slow
def test_per_example_loss_two_ddp_processes_equal_one_process(tmp_path):
    one = _one_process(tmp_path / "one", GLOBAL_BATCH, extra=PER_EXAMPLE)
    ddp = _two_processes(tmp_path / "ddp", GLOBAL_BATCH // 2, extra=PER_EXAMPLE)
    _assert_same_training(ddp, one)
    token = _weights(_one_process(tmp_path / "token", GLOBAL_BATCH, extra=PER_EXAMPLE[1:]))
    assert any(not torch.allclose(w, token[k], **WEIGHT_TOL) for k, w in _weights(one).items())  # another update


CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_accepted(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    loaded = load_config_from_file(str(config))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    nested = {**loaded.fsdp_config, **loaded.deepspeed_config}  # `accelerate launch` maps these to options
    assert set(nested) <= launch_options
    header = config.read_text().split("\ncompute_environment:")[0]
    assert f"accelerate launch --config_file accelerate_configs/{config.name} -m pg_finetune.train" in header


def test_fsdp_wraps_classes_that_exist_in_the_model():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "accelerate_configs/fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    model = PaliGemmaForConditionalGeneration.from_pretrained(resolve_model_path("tiny"))
    present = {type(m).__name__ for m in model.modules()}
    # accelerate raises for any listed class the model lacks, so every name must be present
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= present
    zero3 = load_config_from_file(str(ROOT / "accelerate_configs/deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] and zero3["zero3_save_16bit_model"]
