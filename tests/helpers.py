"""Helpers shared by the tests: where the RealSR images are."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REALSR = REPO.parent / "shared" / "data" / "realsr"


def realsr() -> Path:
    """The full RealSR set beside the repo, else the six samples shipped in it."""
    for root in (SHARED_REALSR, REPO / "data" / "samples" / "realsr"):
        if (root / "HR").is_dir():
            return root
    pytest.skip("no RealSR images (../shared/data/realsr or data/samples/realsr)")
