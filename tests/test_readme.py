"""Every snippet of README.md runs: ``# file:`` blocks become modules in a
temporary folder, ``pycon`` sessions run there as doctests, in order, against
real worker processes on the embedded broker (machinery: tests/snippets.py)."""

from __future__ import annotations

from pathlib import Path

from snippets import run_page, snippet_folder  # noqa: F401 (the fixture)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippets(snippet_folder):  # noqa: F811
    run = run_page(README, snippet_folder)
    assert run.files >= 1
    assert not run.console_failures, "\n\n".join(run.console_failures)
    assert run.sessions >= 5
    assert run.failed == 0, f"{run.failed} README example(s) failed (see output above)"
    assert run.attempted > 20
