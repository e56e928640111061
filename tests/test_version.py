"""One version everywhere: pyproject.toml, offload.__version__ and CHANGELOG.md's latest release."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import offload

ROOT = Path(__file__).resolve().parent.parent
RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", re.M)


def changelog_releases() -> list[tuple[str, str]]:
    return RELEASE.findall((ROOT / "CHANGELOG.md").read_text())


def test_versions_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    latest, _date = changelog_releases()[0]
    assert project == offload.__version__ == latest, (project, offload.__version__, latest)


def test_changelog_is_keep_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "[Unreleased]", "an Unreleased section comes first"
    releases = changelog_releases()
    assert [f"[{v}] - {d}" for v, d in releases] == headings[1:], "every other section is a dated release"
    dates = [d for _, d in releases]
    assert dates == sorted(dates, reverse=True), "newest release first"
    kinds = set(re.findall(r"^### (.+)$", text, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, kinds
