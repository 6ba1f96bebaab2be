"""The documentation cannot drift from the code: the configuration page is what the generator
writes now, and every relative link in README.md and docs/*.md reaches a file (and heading)."""

import difflib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Pages written on other branches, linked from here before they land. A link to one of them
# may dangle only while the page is missing; once it exists, remove it from this set.
PENDING = {"docs/hf.md"}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_what_the_generator_writes():
    gen = _generator()
    want, have = gen.render(), gen.PAGE.read_text()
    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                             "docs/configuration.md (committed)", "generated now"))[:40])
    assert have == want, f"docs/configuration.md is out of date: run {gen.COMMAND}\n{diff}"


def test_configuration_page_lists_every_key_with_its_default():
    from launcher.config import JobConfig

    gen = _generator()
    lines = gen.render().splitlines()
    for section, values in JobConfig().to_dict().items():
        for key, value in values.items():
            entry = [line for line in lines if line.startswith(f"- **`{section}.{key}`** (")]
            assert len(entry) == 1, f"{section}.{key} is listed {len(entry)} times"
            assert f", default `{gen.default_text(value)}`): " in entry[0], entry[0]


@dataclass
class _Undocumented:
    """A section with a field that has no docstring."""

    documented: int = 1
    """Has its docstring."""
    bare: int = 2


def test_an_undocumented_field_is_refused_by_name():
    with pytest.raises(ValueError, match="_Undocumented fields without a docstring: bare"):
        _generator().section_text("section", _Undocumented)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (markup included, not - or _)
    dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def _prose(text: str) -> str:
    """The text without fenced code blocks (their lines are neither headings nor links)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def links(text: str) -> list[str]:
    """Targets of inline links and images outside code (fenced blocks and `spans`)."""
    prose = re.sub(r"`[^`\n]*`", "", _prose(text))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of `page`; files under `root` named in PENDING
    may be missing."""
    problems = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
        if not dest.exists():
            if rel not in PENDING:
                problems.append(f"{target}: {rel} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{target}: {rel} has no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_reach_a_file_and_heading(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: " + "; ".join(broken_links(page))


def test_pending_pages_are_still_missing():
    arrived = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not arrived, f"{arrived} exist now: remove them from PENDING in {Path(__file__).name}"


def test_the_link_checker_sees_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Set-up and `make` (fast)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#set-up-and-make-fast) [ok](#top) [web](https://x.org)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nowhere) `[code](docs/c.md)`\n"
        "[not yet written](docs/hf.md)\n"
        "```\n[fenced](docs/d.md)\n```\n# Top\n")
    assert broken_links(page, tmp_path) == ["docs/b.md: docs/b.md does not exist",
                                  "docs/a.md#nowhere: docs/a.md has no heading with anchor #nowhere"]
