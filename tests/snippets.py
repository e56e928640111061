"""Running the code blocks of a Markdown page, for README.md and docs/.

A page's ``python`` blocks that start with ``# file: NAME`` are written to a
temporary folder; its ``pycon`` sessions run there as doctests, in order, one
namespace for the whole page; its ``console`` blocks run as commands whose
output must match. Every Offload the page leaves behind is stopped.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from testapp import test_id as run_id

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
FILE_MARK = "# file: "
#: Blocks that are shown, not run: shell lines that run until stopped,
#: systemd units, figures, the browser's side (tests/test_browser.py runs it).
SHOWN_ONLY = frozenset({"bash", "sh", "ini", "text", "html", "toml"})
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def blocks(text: str):
    """``(language, body, line number)`` of each fenced block of ``text``."""
    for match in BLOCK.finditer(text):
        lineno = text.count("\n", 0, match.start()) + 1
        yield match.group(1), match.group(2), lineno


def namespaced(body: str) -> str:
    """The workers examples keep their pings to themselves with a control
    exchange of their own; two test runs on one machine need two."""
    return re.sub(r'"(readme|docs)-tasks"', lambda m: f'"{m.group(1)}-tasks-{run_id()}"', body)


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch):
    """A temporary current folder on ``sys.path``; the modules it made are forgotten after.

    Only the page's own modules go (the next page may have a ``myapp`` of its
    own): a library imported meanwhile (Pyramid, Flask) stays, since offload's
    modules keep references to it.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    folder = str(tmp_path)
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(folder):
            sys.modules.pop(name, None)


def console_commands(body: str):
    """``$ command`` lines of a console block, each with the output expected after it."""
    command, expected = None, []
    for line in body.splitlines():
        if line.startswith("$ "):
            if command is not None:
                yield command, "\n".join(expected)
            command, expected = line[2:], []
        else:
            expected.append(line)
    if command is not None:
        yield command, "\n".join(expected)


def run_console(body: str, folder: Path) -> list[str]:
    """Run each command; its output must match (``...`` matches anything)."""
    failures = []
    checker = doctest.OutputChecker()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    for command, expected in console_commands(body):
        proc = subprocess.run(shlex.split(command), cwd=folder, env=env, capture_output=True,
                              text=True, timeout=60)
        got = proc.stdout + proc.stderr
        if not checker.check_output(expected.strip() + "\n", got.strip() + "\n", OPTIONFLAGS):
            failures.append(f"$ {command}\nexpected:\n{expected}\ngot (exit {proc.returncode}):\n{got}")
    return failures


@dataclass
class PageRun:
    """What running a page's blocks did."""

    files: int = 0
    sessions: int = 0
    commands: int = 0
    attempted: int = 0
    failed: int = 0
    console_failures: list[str] = field(default_factory=list)
    #: Blocks neither run nor shown-only: a python block that is no file, an unknown language.
    unrunnable: list[str] = field(default_factory=list)


def _stop_offloads(namespaces) -> None:
    from offload import Offload

    seen: set[int] = set()
    for namespace in namespaces:
        for value in list(namespace.values()):
            try:  # a context proxy (flask.current_app) raises outside its context
                inner = getattr(value, "off", None) if isinstance(value, type(sys)) else None
            except Exception:
                inner = None
            for obj in (value, inner):
                if isinstance(obj, Offload) and id(obj) not in seen:
                    seen.add(id(obj))
                    obj.stop()


def run_page(path: Path, folder: Path, *, strict: bool = False) -> PageRun:
    """Write the page's ``# file:`` blocks into ``folder``, then run its sessions and commands.

    ``strict``: a python block that is not a ``# file:`` block, or a
    language that is neither run nor in :data:`SHOWN_ONLY`, is reported in
    ``unrunnable`` (the docs site's rule: every code block is run).
    """
    text = path.read_text()
    run = PageRun()
    written: list[str] = []
    for lang, body, lineno in blocks(text):
        first = body.splitlines()[0] if body else ""
        if lang == "python" and first.startswith(FILE_MARK):
            name = first[len(FILE_MARK):].strip()
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(namespaced(body))
            compile(target.read_text(), str(target), "exec")  # a typo fails here, not later
            written.append(name)
            run.files += 1
        elif strict and lang not in ("pycon", "console") and lang not in SHOWN_ONLY:
            run.unrunnable.append(f"{path.name}:{lineno}: a {lang} block (python blocks start with '# file: NAME')")
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    globs: dict = {}
    try:
        for lang, body, lineno in blocks(text):
            if lang == "console":
                run.console_failures += run_console(body, folder)
                run.commands += 1
            elif lang == "pycon":
                test = parser.get_doctest(body, globs, f"{path.name}:{lineno}", str(path), lineno)
                runner.run(test, clear_globs=False)
                globs.update(test.globs)  # DocTest works on a copy: carry names on
                run.sessions += 1
    finally:
        modules = [vars(sys.modules[m]) for m in (Path(n).with_suffix("").as_posix().replace("/", ".")
                                                  for n in written) if m in sys.modules]
        _stop_offloads([globs, *modules])
    results = runner.summarize(verbose=False)
    run.attempted, run.failed = results.attempted, results.failed
    return run
