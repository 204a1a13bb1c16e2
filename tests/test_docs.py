"""The README and the pages under docs/ stay true to the code: their Python compiles, passes
mypy and runs, their JSON parses, and every setting they name exists and has its row."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from broadcaster.settings import ENV_PREFIX, Settings
from tests.support import client, receive_json, serving, subscribe

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Python blocks that need more than an interpreter: they are compiled and type-checked, not
# run. Each is recognised by a piece of its text.
NOT_RUN = {
    'Client("ws://127.0.0.1:8000/ws"': "subscribes to a server and reads from it forever",
    "run_scenario(Scenario(": "a load test with a server of its own; tests/test_stress.py runs one",
}


def blocks(language: str) -> list[tuple[str, str]]:
    """Every fenced block in ``language``, with the page and line it starts on."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return found


PYTHON = blocks("python")


def awaits_at_top_level(source: str) -> bool:
    """Whether the block awaits outside any function, as in an asyncio REPL."""
    try:
        compile(source, "<block>", "exec")
    except SyntaxError:
        return True
    return False


def as_module(source: str) -> str:
    """The block as a module mypy can check: a block that awaits at top level becomes the
    body of a coroutine function."""
    if awaits_at_top_level(source):
        return "async def block() -> None:\n" + textwrap.indent(source, "    ")
    return source


def test_there_are_python_blocks() -> None:
    """The extraction finds the pages' Python, so the tests below check something."""
    assert len(PYTHON) >= 4


@pytest.mark.parametrize(("where", "source"), PYTHON, ids=[where for where, _ in PYTHON])
def test_python_block_runs(where: str, source: str) -> None:
    """Each Python block compiles (top-level ``await`` allowed) and, unless it needs a
    server, runs."""
    code = compile(source, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if awaits_at_top_level(source) or any(marker in source for marker in NOT_RUN):
        return
    exec(code, {"__name__": "docs_block"})


def test_python_blocks_type_check(tmp_path: Path) -> None:
    """Every Python block passes ``mypy --strict`` with the project's configuration."""
    files = []
    for number, (where, source) in enumerate(PYTHON):
        path = tmp_path / f"block_{number}.py"
        path.write_text(f"# {where}\n{as_module(source)}")
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    listing = "\n".join(f"{path}: {where}" for path, (where, _) in zip(files, PYTHON, strict=True))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"


JSON = blocks("json")


@pytest.mark.parametrize(("where", "source"), JSON, ids=[where for where, _ in JSON])
def test_json_block_parses(where: str, source: str) -> None:
    """Each JSON block is one JSON value, or one on each line (frames, log lines)."""
    try:
        json.loads(source)
    except json.JSONDecodeError:
        for line in source.splitlines():
            json.loads(line)


SETTINGS = {ENV_PREFIX + name.upper(): field for name, field in Settings.model_fields.items()}


def test_every_named_setting_exists() -> None:
    """Every ``BROADCASTER_*`` name in the README and the pages, code blocks included, is a
    setting: a misspelt one fails here."""
    unknown = {
        f"{page.relative_to(ROOT)}: {name}"
        for page in PAGES
        for name in re.findall(rf"{ENV_PREFIX}[A-Z][A-Z0-9_]*", page.read_text())
        if name not in SETTINGS
    }
    assert not unknown


def documented_defaults() -> dict[str, str]:
    """The settings page's table: each variable and its default column."""
    rows = re.findall(
        rf"^\| `({ENV_PREFIX}\w+)` \| ([^|]*) \|", (ROOT / "docs" / "settings.md").read_text(), re.M
    )
    return {name: default.strip() for name, default in rows}


def default_cell(name: str) -> str | None:
    """How the settings table writes a setting's default; ``None`` where it takes words."""
    default = SETTINGS[name].default
    if name == f"{ENV_PREFIX}HISTORY_SIZE":
        return None  # unset means "depends on the backplane", which the row explains
    if default is None or default == ():
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def test_settings_page_lists_every_setting_with_its_default() -> None:
    """The settings page has one row per setting, no row for anything else, and each row's
    default is the setting's."""
    documented = documented_defaults()
    assert set(SETTINGS) - set(documented) == set(), "settings without a row"
    assert set(documented) - set(SETTINGS) == set(), "rows that name no setting"
    wrong = {
        name: (cell, default_cell(name))
        for name, cell in documented.items()
        if default_cell(name) not in (None, cell)
    }
    assert not wrong


def test_ci_runs_the_readme_test_command() -> None:
    """The quick start has two commands: the first installs no extra and serves, the second
    installs everything and runs the tests, exactly as ``.ci/run`` does."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    serve, test = [source.strip() for _, source in FENCE.findall(quick_start)]
    assert serve.endswith("pip install -q -e . && .venv/bin/broadcaster serve")
    assert test.endswith("pip install -q -e '.[dev]' && .venv/bin/python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


# What the extras install (and uvicorn's `standard` extra beyond httptools and uvloop): the
# quick start's serve command installs none of it.
NOT_INSTALLED_BY_SERVE = (
    "hypothesis",
    "matplotlib",
    "mkdocs",
    "mkdocstrings",
    "nats",
    "picows",
    "psutil",
    "redis",
    "watchfiles",
    "websockets",
    "yaml",
)


async def test_serving_needs_no_extra(tmp_path: Path) -> None:
    """``broadcaster serve`` starts, takes a publish and delivers it with every extra's
    modules made unimportable, as after the quick start's ``pip install -e .``."""
    blocked = ", ".join(repr(name) for name in NOT_INSTALLED_BY_SERVE)
    (tmp_path / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys(({blocked}), None))\n"
    )
    with serving({"PYTHONPATH": str(tmp_path)}) as (_, port):
        async with client(f"ws://127.0.0.1:{port}/ws") as connection:
            await subscribe(connection, "news")
            async with httpx.AsyncClient(trust_env=False) as http:
                response = await http.post(f"http://127.0.0.1:{port}/publish/news", content="hi")
            assert response.status_code == 200
            assert await receive_json(connection) == {"topic": "news", "seq": 1, "data": "hi"}


def test_extras_are_named_by_the_distribution() -> None:
    """Every extra the pages name is an extra of ``broadcaster-ws``: ``broadcaster[...]``
    would install encode/broadcaster."""
    texts = [*PAGES, ROOT / "examples" / "README.md", *(ROOT / "broadcaster").rglob("*.py")]
    wrong = [
        str(path.relative_to(ROOT))
        for path in texts
        if re.search(r"(?<![\w-])broadcaster\[", path.read_text())
    ]
    assert not wrong
