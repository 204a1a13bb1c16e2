"""MkDocs hook: the site's front page is the project's README.md.

The README links to the pages as ``docs/PAGE.md``, which is right on a repository's front
page; on the site the pages sit beside the front page, so that prefix is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

README = Path(__file__).parent.parent / "README.md"


def front_page(readme: str) -> str:
    """The README as the site's front page: its links to ``docs/`` made relative to it."""
    return readme.replace("](docs/", "](")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Serve README.md in place of docs/index.md."""
    if page.file.src_uri == "index.md":
        return front_page(README.read_text())
    return markdown
