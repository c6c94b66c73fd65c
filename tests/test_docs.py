"""The documentation: a short README, links that resolve, every docs page reachable from the README,
and a metrics glossary that matches aapo_app.metrics.METRICS exactly."""

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
# every markdown file whose relative links are checked
LINKED_PAGES = [README, *sorted(DOCS.glob("*.md")), REPO / "bench" / "README.md", REPO / "ds_configs" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _without_code(text: str) -> str:
    """The text with fenced code blocks removed and inline code blanked (its brackets are not links)."""
    return INLINE_CODE.sub("x", FENCE.sub("", text))


def relative_links(path: Path) -> list[str]:
    """The targets of every link in ``path`` that points inside the repository."""
    targets = LINK.findall(_without_code(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto:, ...


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (inline code and links reduced to their text),
    lowercased, punctuation other than '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*_]{1,3}([^*_]+)[*_]{1,3}", r"\1", text)  # emphasis markers (not word-internal _)
    text = text.strip().lower()
    kept = "".join(ch for ch in text
                   if ch in "-_ " or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (outside code blocks), with GitHub's -1, -2 suffixes
    for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_slug_rules():
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
    assert github_slug("Rollout: `rollout.sampler=aapo`") == "rollout-rolloutsampleraapo"
    assert github_slug("Update: trained tokens/s under ZeRO-3") == "update-trained-tokenss-under-zero-3"
    assert github_slug("DeepSpeed configs and the paper's recipes") == "deepspeed-configs-and-the-papers-recipes"
    assert github_slug("vLLM rollouts (GPU): `rollout.backend=vllm`") == "vllm-rollouts-gpu-rolloutbackendvllm"
    assert github_slug("snake_case stays") == "snake_case-stays"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < 10_000, f"README.md is {size} bytes; move detail into docs/ (limit 10,000)"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not broken, f"broken links in {page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_metrics_glossary_matches_metrics():
    """docs/metrics.md has a row ``| `key` | meaning |`` for every key of METRICS, and no row for a key
    METRICS does not define."""
    from aapo_app.metrics import METRICS, glossary_key

    glossary = (DOCS / "metrics.md").read_text()
    for key in METRICS:
        assert f"| `{key}` |" in glossary, f"docs/metrics.md does not define {key}"
    rows = re.findall(r"^\| `([^`]+)` \|", glossary, re.M)
    assert rows, "docs/metrics.md has no glossary table"
    for key in rows:
        try:
            defined = glossary_key(key)
        except KeyError:
            defined = None
        assert defined == key, (f"docs/metrics.md lists `{key}`, which aapo_app.metrics.METRICS does not define"
                                + (f" (it falls under `{defined}`)" if defined else ""))
    assert len(rows) == len(set(rows)), "docs/metrics.md lists a key twice"
