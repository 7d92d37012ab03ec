"""Fixtures shared by the suite: tiny models, a memcached process, the real model repository."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from services.cache.launcher import MemcachedNode, free_port  # noqa: E402
from tests.tiny_models import TINY_ARCHS, build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny-llama, tiny-gpt2, tiny-bert and tiny-roberta (4 layers)."""
    repo = tmp_path_factory.mktemp("tiny-repo")
    for arch in TINY_ARCHS:
        build_tiny_model(arch, repo / f"tiny-{arch}")
    return repo


@pytest.fixture(scope="session")
def real_repo() -> Path:
    """The prepared model repository with the two real models (made by `make test`)."""
    from services.worker.prepare import prepare_repository

    repo = Path(os.environ.get("TESSERA_MODEL_REPOSITORY", ROOT / "model-repository"))
    prepare_repository(repo)
    return repo


@pytest.fixture
def memcached() -> Iterator[MemcachedNode]:
    node = MemcachedNode()
    node.start(port=free_port())
    try:
        yield node
    finally:
        node.stop()
