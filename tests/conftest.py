"""Session-wide test setup: offline tokenizer and shared fixtures (prepared shards)."""

from __future__ import annotations

import os

import pytest

from shared_paths import TIKTOKEN_CACHE, TINYSHAKESPEARE

if TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
os.environ.setdefault("GRAPHC_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Tiny Shakespeare prepared exactly as llm.c's tinyshakespeare.py does."""
    if not TINYSHAKESPEARE.exists():
        pytest.skip(f"shared data not available: {TINYSHAKESPEARE}")
    from graphc.data.prepare import prepare_tinyshakespeare

    return prepare_tinyshakespeare(TINYSHAKESPEARE, tmp_path_factory.mktemp("tinyshakespeare"))
