"""Shared fixtures: every async test runs on asyncio, the loop uvicorn serves on."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"
