"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def segment_codec_file(tmp_path_factory) -> Path:
    """One mask codec per pytest session, trained here on generated shapes (300 steps, about a minute).

    Used by the segmentation tests (task, data prep, end to end); the published vae-oid.npz is never
    downloaded in tests.
    """
    from pg_finetune.tasks.segment.train_codec import main as train_main

    path = tmp_path_factory.mktemp("codec") / "codec.npz"
    assert train_main(["--out", str(path), "--steps", "300", "--quiet"]) == 0
    return path
