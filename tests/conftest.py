"""Shared fixtures: every async test runs on asyncio, the loop uvicorn serves on, and a real
browser for the tests that need one."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest
from playwright.async_api import async_playwright

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from playwright.async_api import Browser

CHROMIUM = shutil.which("chromium")


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium, Debian's own, driven by Playwright; skip where it is missing."""
    if CHROMIUM is None:
        pytest.skip("needs Chromium on PATH: apt-get install -y chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()
