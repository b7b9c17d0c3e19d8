"""The README is a landing page and the docs explain themselves: the README within 2,000 words with the two
commands and the brief's command on its first screens, every generated region present once, every
relative link resolving to a file of the repository, nothing pointing outside it, and no date outside a
region that names the command that made it.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "DESIGN.md"]
REGIONS = {"README.md": ["demo", "tests", "brief", "trust", "budget", "speed"], "results.md": ["results"],
           "ladder.md": ["ladder"],
           "speed.md": ["speed", "baselines-speed"]}


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.split()) <= 2000, len(text.split())
    head = "\n".join(text.splitlines()[:60])
    for command in ("make demo", "make test", "python itm.py --features feats.npz --labels y.npy"):
        assert command in head, command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_regions_present_once(page):
    text = page.read_text(encoding="utf-8")
    for name in REGIONS.get(page.name, []):
        assert text.count(f"<!-- {name}:begin -->") == 1 and text.count(f"<!-- {name}:end -->") == 1, name
        assert text.index(f"<!-- {name}:begin -->") < text.index(f"<!-- {name}:end -->"), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: link {target} does not resolve"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: link {target} leaves the repository"
    for outside in ("../shared", "/work/", "SPEC.md", "BASELINES.md"):
        assert outside not in text, f"{page.name} points outside the repository: {outside}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_dates_only_inside_regions_that_name_their_command(page):
    """A date is a one-machine, one-day fact: it may stand only inside a generated region, and that region
    names the command (`python ...`, or a `$ python ...` line it shows) that made its numbers."""
    text = page.read_text(encoding="utf-8")
    regions = re.findall(r"<!-- ([\w-]+):begin -->(.*?)<!-- \1:end -->", text, flags=re.S)
    outside = re.sub(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", "", text, flags=re.S)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", outside), re.search(r".{60}\b20\d\d-\d\d-\d\d\b.{20}", outside)
    for name, body in regions:
        if re.search(r"\b20\d\d-\d\d-\d\d\b", body):
            assert re.search(r"(`|\$ )python ", body), f"{page.name}: region {name} has a date but names no command"
