"""The README's Python examples run as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [
    textwrap.dedent(block)
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
]


def test_readme_has_python_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_runs(number: int) -> None:
    exec(compile(BLOCKS[number], f"README.md block {number}", "exec"), {})


def test_readme_shows_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_images_are_absolute_links_to_files_in_the_repository() -> None:
    """Relative image links break on the package index: raw URLs from [project.urls] Source."""
    import tomllib
    from urllib.parse import urlparse

    root = README.parent
    source = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Source"]
    raw = f"https://raw.githubusercontent.com/{urlparse(source).path.strip('/')}/main/"
    text = README.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text)
    links += re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert links
    for link in links:
        assert link.startswith(raw), f"{link}: README images must link to {raw}<path>"
        assert (root / link.removeprefix(raw)).is_file(), f"{link}: no such file in the repository"
