"""The README is a front page (issue 42): under 150 lines, every relative link resolves, and every figure in
it is in the result file it links to (a figure typed by hand, or left behind when a result file changes,
fails here). The docs/ pages' relative links are checked too."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

INLINE = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
REFERENCE = re.compile(r"\[([^\]]*)\]\[([^\]]+)\]")
DEFINITION = re.compile(r"^\[([^\]]+)\]:\s*(\S+)\s*$", re.M)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def _definitions(text: str) -> dict:
    return {name.lower(): target for name, target in DEFINITION.findall(text)}


def _links(text: str, defs: dict):
    """(label, target) of every inline and reference link, reference targets resolved."""
    for label, target in INLINE.findall(text):
        yield label, target
    for label, ref in REFERENCE.findall(text):
        yield label, defs.get(ref.lower(), f"<undefined reference [{ref}]>")


def _in_file(number: str, target: str) -> bool:
    path = (README.parent / target.split("#", 1)[0])
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return re.search(r"(?<![\d.])" + re.escape(number) + r"(?!\d)", text) is not None


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < 150, f"README.md has {lines} lines; a front page stays under 150 (details go to docs/)"


@pytest.mark.parametrize("page", [README] + sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    """README.md and every docs/ page: a relative link (inline or by reference) names an existing path."""
    text = page.read_text(encoding="utf-8")
    defs = _definitions(text)
    bad = []
    for label, target in _links(text, defs):
        if target.startswith("<undefined"):
            bad.append(f"[{label}]: {target}")
        elif _is_relative(target) and not (page.parent / target.split("#", 1)[0]).exists():
            bad.append(f"[{label}]({target})")
    assert not bad, f"{page.name} links to paths that do not exist: " + ", ".join(bad)


def test_every_linked_figure_is_in_the_file_it_links_to():
    """A link whose text is a figure (91.35, 68.4–68.7 %) names a file holding that figure; in a table cell,
    every other number of the cell (the times) must be in one of the cell's linked files too."""
    text = README.read_text(encoding="utf-8")
    defs = _definitions(text)
    missing, checked = [], 0
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|") if line.lstrip().startswith("|") else [line]
        for cell in cells:
            links = [(label, target) for label, target in _links(cell, defs)
                     if _is_relative(target) and not target.startswith("<")]
            targets = [t for _, t in links]
            for label, target in links:
                for number in NUMBER.findall(label.replace("–", " ")):
                    checked += 1
                    if not _in_file(number, target):
                        missing.append(f"{number} (link text {label!r}) not in {target}")
            if line.lstrip().startswith("|") and targets:
                stripped = DEFINITION.sub("", INLINE.sub(" ", REFERENCE.sub(" ", cell)))
                for number in NUMBER.findall(stripped):
                    checked += 1
                    if not any(_in_file(number, t) for t in targets):
                        missing.append(f"{number} (cell {cell.strip()!r}) in none of {targets}")
    assert checked > 50, f"only {checked} figures checked: the README's result tables are gone or unlinked"
    assert not missing, "README figures not found in the files they link to:\n" + "\n".join(missing)
