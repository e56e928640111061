"""The one rule of what a task id is (offload.ids), and the entry points of the core that check it.

The web task API's and Pyramid's checks are tested with them (tests/test_web.py,
tests/test_pyramid.py); intake's in tests/test_intake.py.
"""

from __future__ import annotations

import re

import pytest

from offload import Offload
from offload.exceptions import InvalidTaskId, OffloadError
from offload.ids import MAX_TASK_ID, PATTERN, RULE, TASK_ID, check_task_id, is_task_id

A_UUID = "c7f6a7c5-897b-4c01-89b4-e1cc3f2a30d5"  # fixed: xdist's workers collect the same ids
GOOD = [A_UUID, A_UUID.replace("-", ""), A_UUID.upper(), "a", "report:2024-05", "user@example.org",
        "x" * MAX_TASK_ID, "job~1(retry)", "a.b_c-d", "...", ".a", "k=v;w=x,y+z!$&'*", "0"]
BAD = ["", " ", "a b", "a/b", "a\\b", "line\nbreak", "tab\there", "a\x00b", "x" * (MAX_TASK_ID + 1),
       ".", "..", "é", "a?b", "a#b", "a%2Fb", "<script>", 'a"b', "a`b", "{a}", "[a]", "a|b", "a^b",
       A_UUID + "\n", 42, None, b"abc", ["a"]]


@pytest.mark.parametrize("value", GOOD)
def test_what_can_be_a_task_id(value):
    assert is_task_id(value)
    assert check_task_id(value) is value


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_what_cannot_be_a_task_id_is_refused_with_the_rule(value):
    assert not is_task_id(value)
    with pytest.raises(InvalidTaskId, match="is not a task id") as caught:
        check_task_id(value)
    assert RULE in str(caught.value)
    # A ValueError, as off.get raised before, and offload's own error.
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, OffloadError)


def test_a_long_id_is_shown_cut_in_the_message():
    with pytest.raises(InvalidTaskId) as caught:
        check_task_id("y" * 5000)
    assert len(str(caught.value)) < 400 and "yyy..." in str(caught.value)


def test_the_pattern_is_the_rule_in_python_and_in_json_schema_syntax():
    # The same string, compiled, decides as is_task_id does (OpenAPI shows it).
    assert TASK_ID.pattern == PATTERN and PATTERN.startswith("^") and PATTERN.endswith("$")
    for value in GOOD + [v for v in BAD if isinstance(v, str)]:
        assert bool(re.fullmatch(PATTERN, value)) == is_task_id(value), value
    # Every printable ASCII character, one by one: the letters, digits and
    # the URL path segment's own characters pass, nothing else.
    allowed = {c for c in map(chr, range(128)) if is_task_id(c * 3)}
    assert allowed == set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@")


@pytest.fixture
def eager_off(tmp_path):
    # Eager: the test is of the checks made before anything is sent (the
    # web task API's test follows a chosen id through a real worker).
    return Offload({"CELERY_ALWAYS_EAGER": True, "OFFLOAD_DATA_DIR": str(tmp_path)})


def test_off_get_and_off_options_keep_the_rule(eager_off):
    for value in ("a b", "../etc", "", 42):
        with pytest.raises(InvalidTaskId, match="is not a task id"):
            eager_off.get(value)
        with pytest.raises(InvalidTaskId, match="is not a task id"):
            eager_off.options(task_id=value)
    eager_off.options(task_id=None)  # Celery makes one
