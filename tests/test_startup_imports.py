"""Start-up: a run imports only what it uses. bitsandbytes (seconds to import) is for QLoRA only, but
transformers' Trainer imports peft and peft imports bitsandbytes whenever it is installed
(src/pg_finetune/imports.py). Each check runs in a fresh interpreter: pytest's own process has
imported half the stack already."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_hidden_bitsandbytes_fails_to_import_and_is_findable_again_afterwards(tmp_path):
    out = _python(
        """
        import importlib.util, sys
        from pg_finetune.imports import bitsandbytes_hidden
        with bitsandbytes_hidden():
            try:
                import bitsandbytes  # noqa: F401
                print("imported inside")
            except ImportError:
                print("refused inside")
            print("spec inside", importlib.util.find_spec("bitsandbytes") is not None)
        print("in sys.modules after", "bitsandbytes" in sys.modules)
        print("spec after", importlib.util.find_spec("bitsandbytes") is not None)
        """,
        tmp_path,
    )
    assert "refused inside" in out and "spec inside False" in out
    assert "in sys.modules after False" in out
    assert f"spec after {HAS_BNB}" in out


@pytest.mark.slow  # a cold interpreter importing the whole stack: ~10 s
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed: nothing to keep out")
def test_the_trainer_imports_peft_without_bitsandbytes_and_leaves_it_available(tmp_path):
    out = _python(
        """
        import sys
        from pg_finetune.imports import import_without_bitsandbytes
        import_without_bitsandbytes("transformers.trainer")
        print("peft imported", "peft" in sys.modules)
        print("bitsandbytes imported", "bitsandbytes" in sys.modules)
        from peft.import_utils import is_bnb_available
        from transformers.utils.import_utils import is_bitsandbytes_available
        print("available after", is_bnb_available(), is_bitsandbytes_available())
        """,
        tmp_path,
    )
    assert "peft imported True" in out  # transformers.trainer_utils imported peft: the check below is not vacuous
    assert "bitsandbytes imported False" in out
    assert "available after True True" in out


@pytest.mark.slow  # a whole tiny run in a fresh interpreter: ~15 s of CPU
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed: nothing to keep out")
def test_a_lora_run_does_not_import_bitsandbytes_and_qlora_can_still_use_it(tmp_path):
    out = _python(
        f"""
        import sys
        from pg_finetune.train import main
        code = main(["--recipe", {str(ROOT / "recipes/tiny/easyvqa_lora.yaml")!r},
                     "training.output_dir={tmp_path / "run"}", "data.train_split=train[:4]",
                     "data.eval_split=null", "eval.before_and_after=false", "training.max_steps=1",
                     "training.per_device_train_batch_size=2", "logging.html_report=false"])
        print("code", code)
        print("peft imported", "peft" in sys.modules)
        print("bitsandbytes imported", "bitsandbytes" in sys.modules)
        # un-hidden afterwards: peft and transformers see it again (a QLoRA run in this process works)
        from peft.import_utils import is_bnb_4bit_available
        from transformers.utils.import_utils import is_bitsandbytes_available
        print("available after", is_bnb_4bit_available(), is_bitsandbytes_available())
        """,
        tmp_path,
    )
    assert "code 0" in out
    assert "peft imported True" in out  # the run did use peft: the check below is not vacuous
    assert "bitsandbytes imported False" in out
    assert "available after True True" in out


def test_collector_frozen_spares_older_objects_inside_and_frees_them_after():
    import gc
    import weakref

    from pg_finetune.imports import collector_frozen

    class Node:
        pass

    def garbage_cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a  # unreachable once this returns: only the cycle collector frees it
        return weakref.ref(a)

    old = garbage_cycle()
    with collector_frozen():
        assert gc.get_freeze_count() > 0
        new = garbage_cycle()
        gc.collect()
        assert old() is not None  # made before the block: frozen, skipped by the collection
        assert new() is None  # made inside the block: collected as usual
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None  # unfrozen afterwards: a process that runs main() again can free it
