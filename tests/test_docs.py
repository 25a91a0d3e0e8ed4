"""The Markdown documentation holds together: every relative link and #anchor resolves, and no text
points to the project's issue tracker ("issue 12"), which a reader of the repository cannot see."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    {ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/**/*.md"), *ROOT.glob("examples/*.md")}
)
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
ISSUE = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks, inline code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append((number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lowercased, letters (any script), digits,
    marks, '-' and '_' kept, each space made '-', everything else (punctuation, symbols such as §) dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"(`+)(.+?)\1", r"\2", text)  # code renders as its content
    text = re.sub(r"<[^>]+>|[*]", "", text)  # HTML tags and emphasis markers are not text
    keep = []
    for char in text.strip().lower():
        if char == " ":
            keep.append("-")
        elif char in "-_" or unicodedata.category(char)[0] in "LNM":
            keep.append(char)
    return "".join(keep)


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes in ``path``: heading slugs (repeats get -1, -2, …) and <a name/id>."""
    found, seen = set(), {}
    for _, line in prose_lines(path):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_targets(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline and reference-style link in ``path``."""
    targets = []
    for number, line in prose_lines(path):
        targets += [(number, t) for t in LINK.findall(line)]
        reference = REFERENCE.match(line)
        if reference:
            targets.append((number, reference.group(1)))
    return targets


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: target (why)' for each relative link of ``path`` (a file under ``root``, which a link
    starting with '/' is relative to) whose file or #anchor does not exist."""
    broken = []
    for number, target in link_targets(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, …: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = path if not file_part else (root / file_part.lstrip("/") if file_part.startswith("/")
                                             else path.parent / file_part)
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not linked.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{where} (no such anchor in {linked.resolve().relative_to(root.resolve())})")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_tracker_references(path):
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ISSUE.search(line)]
    assert hits == []


@pytest.mark.parametrize(("heading", "slug"), [
    ("5. Four ways to compute a layer, and the cost model", "5-four-ways-to-compute-a-layer-and-the-cost-model"),
    ("9. The layer's contract", "9-the-layers-contract"),
    ("§5.4 Reusing W' (weight path)", "54-reusing-w-weight-path"),
    ("`frod_kernels.peft`: PEFT on our kernels", "frod_kernelspeft-peft-on-our-kernels"),
    ("Δ and λ — **naïve** [view](x.md)", "δ-and-λ--naïve-view"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_a_dead_link_and_anchor_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](#nowhere) [missing](other.md) `[code](skipped.md)`\n"
                    "```\n[fenced](skipped.md)\n```\n[web](https://example.org/x#y)\n")
    assert broken_links(page, tmp_path) == ["page.md:3: #nowhere (no such anchor in page.md)",
                                  "page.md:3: other.md (no such file)"]
