"""The docs: the site builds with warnings as errors, and the README's links lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.docs

# [text](target) and ![alt](target), and reference definitions `[name]: target`.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> list[str]:
    """The link targets of `markdown` that are paths in the repository (not URLs, not
    mail), outside code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", markdown))
    targets = _INLINE.findall(text) + _REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, a
    snippet whose file is gone or a command the CLI reference cannot load fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    # The reference is generated from Click: every command, and a flag's own help text.
    for command in ("nas search", "nas space show", "nas export"):
        assert f">{command}<" in cli
    assert "--time-limit DURATION" in cli
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_readme_links_lead_to_files():
    """Every relative link of README.md names a file or folder of the repository, and no
    anchor (GitHub does not check anchors; a page is what the README links to)."""
    links = relative_links((ROOT / "README.md").read_text())
    assert "docs/architecture.md" in links and "bench/README.md" in links
    with_anchor = [link for link in links if "#" in link]
    assert not with_anchor, f"README.md links with an anchor: {with_anchor}"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_relative_links_are_found():
    """The link finder itself: paths are found, URLs, mail and code are not."""
    markdown = ("[a](docs/a.md) ![b](img/b.png \"title\") [c](https://x.org/c.md) "
                "[d](mailto:x@y.org) `[e](e.md)`\n```\n[f](f.md)\n```\n[g]: docs/g.md\n")
    assert relative_links(markdown) == ["docs/a.md", "img/b.png", "docs/g.md"]
