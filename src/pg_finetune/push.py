"""Upload a training run's model to the Hugging Face Hub (also installed as `pg-push`).

    python -m pg_finetune.push runs/tiny_easyvqa_lora --repo-id you/paligemma-easyvqa --dry-run
    python -m pg_finetune.push runs/tiny_easyvqa_lora --repo-id you/paligemma-easyvqa [--public]

What goes up: every file of RUN_DIR/final/ at the root of the repo (the adapter or the full
weights, the processor, the model card README.md and the resolved recipe.yaml, as training wrote
them), and RUN_DIR/merged/ under merged/ when the run merged its LoRA weights. The run's own
recipe.yaml is uploaded when final/ has none. Never a pickle: *.bin, *.pt, *.pth, *.pkl, *.pickle
and *.ckpt files are refused (loading one can run code), as are links and hidden files; each is
named on stderr. The repo is private unless --public.

--dry-run prints what would be uploaded (local path -> path in the repo, size) and touches no
network. Log in first (`hf auth login`, or HF_TOKEN). Exit codes: 0 ok, 1 the Hub refused or
could not be reached, 2 usage or bad input (no RUN_DIR/final, nothing to upload).
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Formats that torch / pickle load by running code. Weights go up as safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What RUN_DIR holds -> where it goes in the repo (final/ at the root: `from_pretrained(repo_id)` loads it).
SOURCES = {"final": "", "merged": "merged"}
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class PushError(Exception):
    """A problem with the run directory or the arguments (exit 2)."""


@dataclass(frozen=True)
class Upload:
    local: Path
    in_repo: str
    size: int


@dataclass(frozen=True)
class Source:
    """Files of one local folder that go under `path_in_repo` ("" = the repo's root), one commit."""

    folder: Path
    path_in_repo: str
    files: list[Upload]


@dataclass
class Plan:
    """What one push uploads and what it refuses."""

    sources: list[Source] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)

    @property
    def uploads(self) -> list[Upload]:
        return [u for source in self.sources for u in source.files]


def _refusal(path: Path, folder: Path) -> str | None:
    """Why `path` (under `folder`) is never uploaded; None when it may be."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"a pickle ({path.suffix}): loading it can run code; never uploaded"
    if path.is_symlink():
        return "a link: its target could be anything; copy the file in if it belongs"
    if any(part.startswith(".") for part in path.relative_to(folder).parts):
        return "a hidden file"
    return None


def plan_push(run_dir: Path) -> Plan:
    """The files of `run_dir` a push uploads (see the module docstring); PushError without final/."""
    if not run_dir.is_dir():
        raise PushError(f"RUN_DIR {run_dir} is not a folder")
    if not (run_dir / "final").is_dir():
        raise PushError(f"{run_dir / 'final'} does not exist: push a run directory that training finished "
                        "(it holds final/)")  # fmt: skip
    plan = Plan()
    for name, prefix in SOURCES.items():
        folder = run_dir / name
        if not folder.is_dir():
            continue
        files = []
        for path in sorted(folder.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            if (why := _refusal(path, folder)) is not None:
                plan.refused.append((path, why))
                continue
            in_repo = "/".join(p for p in (prefix, path.relative_to(folder).as_posix()) if p)
            files.append(Upload(path, in_repo, path.stat().st_size))
        plan.sources.append(Source(folder, prefix, files))
    if "recipe.yaml" not in {u.in_repo for u in plan.uploads} and (run_dir / "recipe.yaml").is_file():
        recipe = run_dir / "recipe.yaml"
        plan.sources.append(Source(run_dir, "", [Upload(recipe, "recipe.yaml", recipe.stat().st_size)]))
    return plan


def human_size(size: int) -> str:
    """`812 B`, `3.4 kB`, `12.0 MB` (powers of 1000, as the Hub shows sizes)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def upload(plan: Plan, repo_id: str, *, private: bool) -> str:
    """Create the repo (if needed) and upload the plan, one commit per source folder; the repo's URL.

    `allow_patterns` names each planned file (escaped, so a `[` in a name is literal): a file that
    appears in the folder after planning is not uploaded.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    for source in plan.sources:
        if not source.files:
            continue
        api.upload_folder(
            repo_id=repo_id,
            folder_path=source.folder,
            path_in_repo=source.path_in_repo or None,
            allow_patterns=[glob.escape(u.local.relative_to(source.folder).as_posix()) for u in source.files],
            ignore_patterns=[f"*{suffix}" for suffix in PICKLE_SUFFIXES],
            repo_type="model",
            commit_message=f"pg-finetune: upload {source.folder.name}/",
        )
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_finetune.push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir (holds final/)")
    parser.add_argument("--repo-id", required=True, help="user/name or org/name on the Hub")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (default)")  # fmt: skip
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    parser.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    args = parser.parse_args(argv)
    if not REPO_ID.fullmatch(args.repo_id) or "--" in args.repo_id or ".." in args.repo_id:
        parser.error(f"--repo-id {args.repo_id!r}: give user/name (letters, digits, '-', '_', '.')")

    try:
        plan = plan_push(Path(args.run_dir))
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, why in plan.refused:
        print(f"refused: {path}: {why}", file=sys.stderr)
    uploads = plan.uploads
    if not uploads:
        print(f"error: nothing to upload in {args.run_dir}", file=sys.stderr)
        return 2
    if "README.md" not in {u.in_repo for u in uploads}:
        print(f"note: {Path(args.run_dir) / 'final'} has no README.md: the repo will have no model card",
              file=sys.stderr)  # fmt: skip

    kind = "private" if args.private else "public"
    total = human_size(sum(u.size for u in uploads))
    head = "dry run, nothing uploaded: would upload" if args.dry_run else "uploading"
    print(f"{head} {len(uploads)} files ({total}) to the {kind} model repo {args.repo_id}:")
    width = max(len(str(u.local)) for u in uploads)
    for u in uploads:
        print(f"  {str(u.local):<{width}} -> {u.in_repo} ({human_size(u.size)})")
    if args.dry_run:
        return 0
    try:
        url = upload(plan, args.repo_id, private=args.private)
    except Exception as err:  # network, auth and Hub errors alike (httpx, HfHubHTTPError, OSError) end here
        print(f"error: upload to {args.repo_id} failed: {type(err).__name__}: {err}\n"
              "Check the network, that you are logged in (`hf auth login` or HF_TOKEN) with write access, "
              "and the repo id.", file=sys.stderr)  # fmt: skip
        return 1
    print(f"uploaded: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
