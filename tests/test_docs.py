"""The guides match the repository: README links every guide, every relative link in README and docs/ points at a
file (and heading) that exists, and every example the guides name is there. That docs/configuration.md matches
the command line is tests/test_cli.py::test_configuration_docs_match_the_parser."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["quickstart.md", "multi_gpu.md", "configuration.md", "api_reference.md", "troubleshooting.md",
          "migrating.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", path.read_text(), re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are not links
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


def test_readme_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    for guide in GUIDES:
        assert f"(docs/{guide})" in readme, f"README does not link docs/{guide}"
        assert (ROOT / "docs" / guide).is_file(), f"docs/{guide} is missing"


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in _links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_examples_named_in_the_guides_exist():
    texts = (ROOT / "README.md").read_text() + "".join((ROOT / "docs" / g).read_text() for g in GUIDES)
    named = set(re.findall(r"\b([a-z_]+\.py)\b", texts))
    examples = {p.name for p in (ROOT / "examples").glob("*.py")}
    for name in ("example_simple_concurrent.py", "example_weight_streaming.py", "rl_loop.py", "stress_test.py",
                 "original_client.py"):
        assert name in examples and name in named, name
