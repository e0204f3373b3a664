"""Shared fixtures: the reference's captures and vectors (tests/vectors/, see its README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS_DIR = Path(__file__).parent / "vectors"
CAPTURE_FILES = sorted(p.name for p in VECTORS_DIR.glob("cap_*.json"))


def load_json(name: str) -> dict[str, Any]:
    return json.loads((VECTORS_DIR / name).read_text())


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return load_json("vectors.json")
