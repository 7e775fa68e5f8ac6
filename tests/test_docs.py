"""The docs the code cites are in the repo: each section of ARCHITECTURE.md cited by its anchor
is one of its headings."""

import re
from pathlib import Path

import pytest

from tests.bench_modules import bench_modules

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO_ROOT / "docs" / "ARCHITECTURE.md"
CITATION = re.compile(r"ARCHITECTURE\.md#([a-z0-9-]+)")
SOURCES = ["phi3v", "phi3v_app", "bench", "tests", "docs", "README.md", "download_models.py"]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def citations() -> list[tuple[str, str]]:
    """(file, anchor) for every citation of an ARCHITECTURE.md section in the code, tests, docs."""
    found = []
    for source in SOURCES:
        root = REPO_ROOT / source
        files = (
            [root] if root.is_file() else sorted(root.rglob("*.py")) + sorted(root.rglob("*.md"))
        )
        for path in files:
            for anchor in CITATION.findall(path.read_text(encoding="utf-8")):
                found.append((str(path.relative_to(REPO_ROOT)), anchor))
    return found


def test_heading_anchors_follow_githubs_rule():
    assert heading_anchors("## The fast precision's copies\n### Two export layouts") == {
        "the-fast-precisions-copies",
        "two-export-layouts",
    }


def test_the_code_cites_architecture_sections():
    assert len(citations()) >= 10


@pytest.mark.parametrize(("path", "anchor"), citations())
def test_every_cited_section_exists(path, anchor):
    assert anchor in heading_anchors(ARCHITECTURE.read_text(encoding="utf-8")), path


def test_the_performance_numbers_in_the_docs_are_the_results_files():
    """docs/PERFORMANCE.md and the README's speed and accuracy blocks are generated from
    ``bench/results/`` by ``bench/report.py``: a hand edit, or a result committed without
    running the report, shows up here."""
    with bench_modules("report") as (report,):
        stale = [
            path.relative_to(REPO_ROOT).as_posix()
            for path, text in report.generated().items()
            if path.read_text(encoding="utf-8") != text
        ]
    assert stale == [], f"out of date: {stale}; run python bench/report.py"
