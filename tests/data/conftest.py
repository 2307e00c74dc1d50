"""Module-scoped data-dir fixture for tests/data (the root ``data_dir`` is function-scoped).

Same rules as ``tests/conftest.py``: ``NTKIT_DATA_DIR`` (default ``../shared/data`` next to the
repo); a missing dir skips, or fails when ``NTKIT_REQUIRE_DATA=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir_m() -> Path:
    d = Path(os.environ.get("NTKIT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if not d.is_dir():
        if os.environ.get("NTKIT_REQUIRE_DATA") == "1":
            pytest.fail(f"NTKIT_REQUIRE_DATA=1 but data dir {d} does not exist")
        pytest.skip(f"data dir {d} not found (set NTKIT_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def ntkit_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer / block cache for the whole session (tokenizer training is the slow part)."""
    return tmp_path_factory.mktemp("ntkit-cache")
