"""The documentation stays navigable: every relative link resolves, and the README stays a front page.

Checks every relative markdown link and image in README.md, SECURITY.md, docs/*.md and benchmarks/README.md:
the file it points at exists and, for a link into a markdown file with a `#fragment`, a heading of that
file has that GitHub-style anchor. Links inside fenced code blocks and inline code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 220
# The two fresh-machine commands the README opens with, exactly (CI and newcomers copy them from here).
README_FIRST_LINES = [
    "# nexus-authz",
    "",
    "```sh",
    "bash .ci/setup && .venv/bin/nexus-authz demo         "
    "# fresh machine: set up, run the demo (Envoy + nexus-authz + mock OpenAI upstream)",
    "bash .ci/setup && .venv/bin/python -m pytest         # fresh machine: set up, run the whole test suite",
    "```",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "SECURITY.md", REPO / "benchmarks" / "README.md"]
    files += sorted((REPO / "docs").glob("*.md"))
    return files


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (no backticks, link targets or emphasis marks),
    lower-cased, punctuation except `-` and `_` dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](target) -> text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and unquote(fragment) not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{fragment} in {resolved.relative_to(root)}")
    return problems


def test_slug_matches_github() -> None:
    assert slug("Policy API, CLI and metrics") == "policy-api-cli-and-metrics"
    assert slug("nginx (`auth_request`)") == "nginx-auth_request"
    assert slug("Known gaps (issue 14)") == "known-gaps-issue-14"
    assert slug("`ledger`, `accounting`") == "ledger-accounting"
    assert slug("Distributed mode (Redis)") == "distributed-mode-redis"


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file and a missing anchor are reported, good links are not."""
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md) [ok](other.md#a-section) [ok](other.md#a-section-1) [ok](#here)\n"
        "## Here\n"
        "[bad](missing.md) [bad](other.md#nowhere) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    assert broken_links(doc, root=tmp_path) == [
        "doc.md:3: missing.md: no such file",
        "doc.md:3: other.md#nowhere: no heading with anchor #nowhere in other.md",
    ]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(REPO)} is missing"
    assert broken_links(path) == []


def test_docs_are_linked() -> None:
    """Every page under docs/ is reachable from the README."""
    linked = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages, "docs/ has no pages"
    assert pages - linked == set()
    assert {"SECURITY.md", "benchmarks/README.md"} <= linked


def test_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    assert lines[: len(README_FIRST_LINES)] == README_FIRST_LINES
