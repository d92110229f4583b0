"""`pg_finetune.push`: what a push uploads, checked with --dry-run on a real tiny run (issue #17).

The Hub is not reachable from tests: the real upload path is run against a fake `HfApi` that
records its calls (and one that fails like a network would).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from pg_finetune.push import human_size, main
from pg_finetune.train import main as train_main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished, merged LoRA run on the tiny model: final/ (adapter), merged/ (full), checkpoint-2/."""
    run = tmp_path_factory.mktemp("runs") / "run"
    code = train_main(["--recipe", "recipes/tiny/easyvqa_lora.yaml", f"training.output_dir={run}",
                       "training.max_steps=2", "eval.before_and_after=false", "logging.html_report=false",
                       "training.merge_lora=true", "data.train_split=train[:16]", "eval.max_samples=4",
                       "training.per_device_train_batch_size=4"])  # fmt: skip
    assert code == 0
    return run


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    """A copy of the trained run that a test may change."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _listing(out: str) -> dict[str, tuple[str, str]]:
    """path in repo -> (local path, size) from the dry-run listing."""
    rows = re.findall(r"^  (\S+)\s+-> (\S+) \((.+)\)$", out, flags=re.MULTILINE)
    return {in_repo: (local, size) for local, in_repo, size in rows}


def test_dry_run_lists_final_at_the_root_and_merged_under_merged(run, capsys):
    assert main([str(run), "--repo-id", "me/tiny-easyvqa", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listing = _listing(out)
    final = {p.name for p in (run / "final").iterdir()}
    merged = {f"merged/{p.name}" for p in (run / "merged").iterdir()}
    assert set(listing) == final | merged
    assert {"README.md", "recipe.yaml", "adapter_model.safetensors", "adapter_config.json"} <= final
    assert "merged/model.safetensors" in listing
    card = run / "final" / "README.md"
    assert listing["README.md"] == (str(card), human_size(card.stat().st_size))
    assert "checkpoint" not in out and "optimizer.pt" not in out  # only final/ and merged/ go up
    assert f"would upload {len(listing)} files" in out and "private model repo me/tiny-easyvqa" in out


def test_a_planted_pickle_is_refused_and_the_rest_still_listed(run, capsys):
    (run / "final" / "x.pt").write_bytes(b"\x80\x04pickle")
    (run / "merged" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert main([str(run), "--repo-id", "me/tiny", "--dry-run", "--public"]) == 0
    captured = capsys.readouterr()
    listing = _listing(captured.out)
    assert "x.pt" not in captured.out and "pytorch_model.bin" not in captured.out
    assert "adapter_model.safetensors" in listing
    assert f"refused: {run / 'final' / 'x.pt'}: a pickle (.pt)" in captured.err
    assert f"refused: {run / 'merged' / 'pytorch_model.bin'}: a pickle (.bin)" in captured.err
    assert "public model repo" in captured.out


def test_without_merged_only_final_and_the_runs_recipe_when_final_lacks_one(run, capsys):
    shutil.rmtree(run / "merged")
    (run / "final" / "recipe.yaml").unlink()
    assert main([str(run), "--repo-id", "me/tiny", "--dry-run"]) == 0
    listing = _listing(capsys.readouterr().out)
    assert not any(k.startswith("merged/") for k in listing)
    assert listing["recipe.yaml"][0] == str(run / "recipe.yaml")


@pytest.mark.parametrize("layout", ["missing", "no final"])
def test_a_missing_run_dir_or_final_exits_2(tmp_path, capsys, layout):
    run = tmp_path / "run"
    if layout == "no final":
        (run / "checkpoint-2").mkdir(parents=True)
    assert main([str(run), "--repo-id", "me/tiny", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(run) in err and "Traceback" not in err


@pytest.mark.parametrize("repo_id", ["tiny", "me/", "me/a/b", "me/with space", "me/a--b"])
def test_a_bad_repo_id_is_a_usage_error(run, capsys, repo_id):
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--repo-id", repo_id, "--dry-run"])
    assert exit_info.value.code == 2
    assert "--repo-id" in capsys.readouterr().err


class FakeApi:
    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_api(monkeypatch) -> type[FakeApi]:
    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_the_upload_sends_exactly_the_listed_files(run, capsys, fake_api):
    (run / "final" / "x.pt").write_bytes(b"pickle")
    assert main([str(run), "--repo-id", "me/tiny"]) == 0
    assert "uploaded: https://huggingface.co/me/tiny" in capsys.readouterr().out
    (_, repo_id, created), *uploads = fake_api.calls
    assert repo_id == "me/tiny" and created["private"] is True and created["exist_ok"] is True
    by_folder = {Path(kwargs["folder_path"]).name: kwargs for _, kwargs in uploads}
    assert set(by_folder) == {"final", "merged"}
    assert by_folder["final"]["path_in_repo"] is None and by_folder["merged"]["path_in_repo"] == "merged"
    assert sorted(by_folder["final"]["allow_patterns"]) == sorted(
        p.name for p in (run / "final").iterdir() if p.name != "x.pt"
    )
    assert "*.pt" in by_folder["final"]["ignore_patterns"]


def test_a_network_failure_is_a_clear_error_and_exit_1(run, capsys, fake_api):
    fake_api.fail = ConnectionError("Failed to resolve 'huggingface.co'")
    assert main([str(run), "--repo-id", "me/tiny", "--public"]) == 1
    err = capsys.readouterr().err
    assert "error: upload to me/tiny failed: ConnectionError: Failed to resolve" in err
    assert "hf auth login" in err and "Traceback" not in err


def test_human_size():
    sizes = [human_size(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**9)]
    assert sizes == ["0 B", "999 B", "1.0 kB", "1.2 MB", "5.0 GB"]
