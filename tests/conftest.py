"""Shared test paths. The reference material lives in ../shared beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA.is_dir():
        pytest.skip(f"test media not found at {MEDIA} (the shared/ folder beside the repository)")
    return MEDIA


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(
            f"model fixtures not found at {FIXTURES} (the shared/ folder beside the repository)"
        )
    return FIXTURES
