"""The documentation cannot rot silently: links and anchors resolve, the README's commands parse, and the command
reference is the one the CLI writes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit import clidoc
from audit.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def test_slug_follows_github():
    assert slug("Black-box services over HTTP, and `audit serve`") == "black-box-services-over-http-and-audit-serve"
    assert slug("audit toy build") == "audit-toy-build"
    assert slug("What it answers, and what it cannot") == "what-it-answers-and-what-it-cannot"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if not t.startswith("http")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def readme_commands() -> list[str]:
    """Every `audit ...` command line in the README's shell blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "audit":
                cmds.append(words[1:])
    return cmds


def test_readme_shows_commands():
    assert len(readme_commands()) >= 8


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a[:2]))
def test_readme_command_parses(args):
    # --help is eager: the options before it are parsed (an unknown one fails) but nothing runs.
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"audit {' '.join(args)}: {result.output}"


def test_command_reference_is_current():
    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert page == clidoc.render(), "docs/commands.md is stale: run `python -m audit.clidoc > docs/commands.md`"


def test_real_shape_figures_are_the_recorded_run():
    """The real-shape tables in the README and benchmarks/README.md and docs/cluster.md's projection are what
    benchmarks/realsize.py renders from the run recorded in benchmarks/results/realsize.json, not figures typed by
    hand (regenerate: python benchmarks/realsize.py --from-json benchmarks/results/realsize.json)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("realsize", ROOT / "benchmarks" / "realsize.py")
    realsize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realsize)
    found = realsize.sections(realsize._merge([ROOT / "benchmarks" / "results" / "realsize.json"]))
    assert set(found) == {"README.md", "benchmarks/README.md", "docs/cluster.md"}
    for page, text in found.items():
        assert text.strip() in (ROOT / page).read_text(encoding="utf-8"), f"{page}: stale real-shape figures"
