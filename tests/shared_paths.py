"""Where the tests find the read-only shared data (``/work/shared`` beside the checkout).

The data (GPT-2 BPE files, tiktoken's cache, Tiny Shakespeare) is never copied into the
repository; tests that need it skip cleanly on a machine that does not have it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
GPT2_DIR = DATA / "gpt2"
TIKTOKEN_CACHE = DATA / "tiktoken_cache"
TINYSHAKESPEARE = DATA / "tinyshakespeare.txt"


def shared_path(*parts: str) -> Path:
    """``DATA / parts``, or skip the calling test when it is not there."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


requires_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not available: {DATA}")
