"""The types a user's checker sees: tests/typing/ok.py passes mypy, bad.py fails as marked.

Each line of bad.py that carries ``# E: message`` must get a mypy error
containing ``message``, and no other line may get one: a type that became
``Any`` (an error gone) fails here as surely as a new false alarm.
offload's own modules are checked by ``mypy offload`` in .ci/run; here
their errors are silenced (``--follow-imports=silent``) so that each file
is judged on its own lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPING = Path(__file__).resolve().parent / "typing"
ERROR_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*)$")


def mypy(path: Path, cache: Path) -> tuple[int, list[tuple[int, str]]]:
    """Run mypy (the project's settings) on one file; its exit status and ``(line, message)`` errors."""
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(cache),
         "--no-error-summary", "--hide-error-context", "--no-pretty", str(path.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 2: mypy itself failed
    errors = [(int(m["line"]), m["message"]) for m in map(ERROR_LINE.match, run.stdout.splitlines()) if m]
    return run.returncode, errors


def expected_errors(path: Path) -> dict[int, str]:
    """``{line: message}`` of the ``# E: message`` markers."""
    return {number: line.split("# E: ", 1)[1].strip()
            for number, line in enumerate(path.read_text().splitlines(), 1) if "# E: " in line}


def test_ok_file_type_checks(tmp_path):
    status, errors = mypy(TYPING / "ok.py", tmp_path)
    assert errors == [] and status == 0, "\n".join(f"ok.py:{line}: {message}" for line, message in errors)


def test_bad_file_fails_exactly_as_marked(tmp_path):
    expected = expected_errors(TYPING / "bad.py")
    assert len(expected) >= 15, expected
    status, errors = mypy(TYPING / "bad.py", tmp_path)
    assert status == 1
    got: dict[int, list[str]] = {}
    for line, message in errors:
        got.setdefault(line, []).append(message)
    unexpected = {line: messages for line, messages in got.items() if line not in expected}
    missing = {line: message for line, message in expected.items()
               if not any(message in got_message for got_message in got.get(line, []))}
    assert not unexpected and not missing, f"unexpected errors: {unexpected}\nmissing errors: {missing}"
