"""Every snippet of README.md runs: ``# file:`` blocks become modules in a
temporary folder, ``pycon`` sessions run there as doctests, in order, against
real worker processes on the embedded broker."""

from __future__ import annotations

import doctest
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from testapp import test_id as run_id

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(text: str):
    for match in BLOCK.finditer(text):
        lineno = text.count("\n", 0, match.start()) + 1
        yield match.group(1), match.group(2), lineno


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if not name.startswith(("offload", "celery", "kombu", "redis", "amqp", "_pytest")):
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
    # The snippets' folder first, then the offload under test (a checkout's PYTHONPATH).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p))
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    for command, expected in console_commands(body):
        proc = subprocess.run(shlex.split(command), cwd=folder, env=env, capture_output=True,
                              text=True, timeout=60)
        got = proc.stdout + proc.stderr
        if not checker.check_output(expected.strip() + "\n", got.strip() + "\n",
                                    doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE):
            failures.append(f"$ {command}\nexpected:\n{expected}\ngot (exit {proc.returncode}):\n{got}")
    return failures


def test_readme_snippets(readme_folder):
    text = README.read_text()
    files = 0
    for lang, body, _lineno in blocks(text):
        first = body.splitlines()[0] if body else ""
        if lang == "python" and first.startswith("# file: "):
            # The Workers example keeps its pings to itself with a control
            # exchange of its own; two test runs on one machine need two.
            body = body.replace('"readme-tasks"', f'"readme-tasks-{run_id()}"')
            (readme_folder / first[len("# file: "):].strip()).write_text(body)
            files += 1
    assert files >= 1
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict = {}
    sessions = 0
    try:
        console_failures: list[str] = []
        for lang, body, lineno in blocks(text):
            if lang == "console":
                console_failures += run_console(body, readme_folder)
                continue
            if lang != "pycon":
                continue
            test = parser.get_doctest(body, globs, f"README.md:{lineno}", str(README), lineno)
            runner.run(test, clear_globs=False)
            globs.update(test.globs)  # DocTest works on a copy: carry names on
            sessions += 1
    finally:
        for name in ("off", "tasks"):
            obj = globs.get(name)
            obj = getattr(obj, "off", obj)
            if obj is not None and hasattr(obj, "stop"):
                obj.stop()
    results = runner.summarize(verbose=False)
    assert not console_failures, "\n\n".join(console_failures)
    assert sessions >= 5
    assert results.failed == 0, f"{results.failed} README example(s) failed (see output above)"
    assert results.attempted > 20
