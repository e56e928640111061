"""What a worker accepts (offload/intake.py): forged messages against a real worker.

Each attack is published straight to a worker's queue, as anyone who can
write to the broker could. The worker must refuse it to its dead letters,
keep running, and run the next task.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
import zlib
from pathlib import Path

import pytest
from kombu import Exchange, Queue

from conftest import WorkerProcess, require_service, wait_until
from testapp import add, test_id

KINDS = ["embedded", "redis"]


@pytest.fixture(scope="module", params=KINDS)
def intake(request, data_root):
    """An Offload and a worker of its own on a queue of its own (attacks may kill it)."""
    kind = request.param
    if kind == "redis":
        require_service("redis")
    import importlib

    off = importlib.import_module(f"testapp.on_{kind}").off
    queue = f"offload-test-{test_id()}-intake-{kind}"
    worker = WorkerProcess(f"testapp.on_{kind}", f"intake-{kind}-{test_id()}@%h",
                           data_root / f"intake-{kind}.log", queues=queue)
    try:
        future = off.options(queue=queue).submit(add, 1, 1)
        try:
            assert future.result(timeout=60) == 2
        except Exception as exc:
            raise RuntimeError(f"the intake worker did not start: {exc!r}\n{worker.log_tail()}") from exc
        yield off, worker, queue
    finally:
        worker.stop()


def publish(off, queue: str, body, *, content_type="application/json", content_encoding="utf-8",
            headers=None, task="offload.dispatch") -> str:
    """Put one raw message on ``queue``; its task id."""
    task_id = str(uuid.uuid4())
    all_headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                   "group": None, "retries": 0, "eta": None, "expires": None}
    all_headers.update(headers or {})
    all_headers = {key: value for key, value in all_headers.items() if value is not ...}
    target = Queue(queue, Exchange(queue), routing_key=queue)
    with off.celery.producer_or_acquire() as producer:
        producer.publish(body, exchange=target.exchange, routing_key=queue, declare=[target],
                         content_type=content_type, content_encoding=content_encoding,
                         headers=all_headers, serializer=None, retry=True)
    return task_id


def dead_letters(off) -> list[dict]:
    path = Path(off.settings.data_dir) / "dead-letters.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def bomb(size: int = 300 * 1024 * 1024) -> bytes:
    """``size`` zero bytes, zlib-compressed (kombu's "gzip"): about 300 KB."""
    packer = zlib.compressobj(9)
    block = b"\0" * (1024 * 1024)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + packer.flush()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


ATTACKS = {
    # kombu's raw type, which it accepts without a decoder: Celery's strategy raised TypeError.
    "raw-application-data": dict(body=b"\x00\x01 not json", content_type="application/data",
                                 content_encoding="binary"),
    # A JSON body that is not [args, kwargs, embed]: the worker exited with status 0.
    "json-empty-list": dict(body="[]"),
    "json-not-a-list": dict(body='{"args": 1}'),
    # The dispatcher's shape: a reference, a list, a dict.
    "dispatch-wrong-shape": dict(body=json.dumps([["testapp:add", {"x": 1}, []], {}, {}])),
    # A body marked compressed: kombu inflated 300 KB to 300 MB before any check.
    "gzip-bomb": dict(body=None, content_encoding="binary", headers={"compression": "application/x-gzip"}),
    # A compression the app does not use.
    "bz2-unused": dict(body=b"BZh9", content_encoding="binary", headers={"compression": "application/x-bz2"}),
    # Nesting that makes the JSON parser raise RecursionError, and less that still passes it.
    "nested-100000": dict(body=f'[["testapp:capture", [{nested(100_000)}], {{}}], {{}}, {{}}]'),
    "nested-150": dict(body=f'[["testapp.calls:capture", [{nested(150)}], {{}}], {{}}, {{}}]'),
    # Numbers JSON has no spelling for.
    "non-finite": dict(body='[["testapp:add", [1e999999, 1], {}], {}, {}]'),
    "nan": dict(body='[["testapp:add", [NaN, 1], {}], {}, {}]'),
    # Headers the strategy reads without checking.
    "id-not-a-string": dict(body='[["testapp:add", [1, 2], {}], {}, {}]', headers={"id": ["x"]}),
    # An id that breaks offload.ids' rule: it would become a path in a URL or key.
    "id-a-path": dict(body='[["testapp:add", [1, 2], {}], {}, {}]', headers={"id": "../../keys"}),
}

REASONS = {
    "raw-application-data": "content type 'application/data' is not accepted",
    "json-empty-list": "not Celery's [args, kwargs, embed]",
    "json-not-a-list": "not Celery's [args, kwargs, embed]",
    "dispatch-wrong-shape": "offload.dispatch takes",
    "gzip-bomb": "'application/x-gzip' is not one this app uses",
    "bz2-unused": "is not one this app uses",
    "nested-100000": "cannot be decoded",
    "nested-150": "nest deeper than 100 levels",
    "non-finite": "non-finite number",
    "nan": "non-finite number",
    "id-not-a-string": "'id' headers are not",
    "id-a-path": "'id' headers are not",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_forged_message_is_dead_lettered_and_the_worker_keeps_running(intake, attack):
    off, worker, queue = intake
    spec = dict(ATTACKS[attack])
    if spec["body"] is None:
        spec["body"] = bomb()
    before = rss_mb(worker.pid)
    task_id = publish(off, queue, spec.pop("body"), **spec)
    # The next task on the same queue runs: the worker did not stop.
    assert off.options(queue=queue).submit(add, 2, 3).result(timeout=60) == 5, worker.log_tail()
    assert worker.proc.poll() is None, worker.log_tail()
    from offload.exceptions import RejectedMessage

    reason = REASONS[attack]
    if not attack.startswith("id-"):
        assert wait_until(lambda: any(entry["task_id"] == task_id for entry in dead_letters(off)))
        entries = [entry for entry in dead_letters(off) if entry["task_id"] == task_id]
        assert len(entries) == 1 and reason in entries[0]["reason"], entries
        # The bodies are tasks' arguments: the file is its owner's alone.
        mode = (Path(off.settings.data_dir) / "dead-letters.jsonl").stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
        # Its future ends with the reason instead of waiting forever.
        error = off.get(task_id).exception(timeout=30)
        assert isinstance(error, RejectedMessage) and reason in str(error)
    else:  # no result is written under an id that is not one
        shown = str(spec["headers"]["id"])
        assert wait_until(lambda: any(reason in entry["reason"] and entry["task_id"] == shown
                                      for entry in dead_letters(off)))
    if attack == "gzip-bomb":
        # Refused without inflating it (kombu inflated 300 MB before any check).
        assert rss_mb(worker.pid) - before < 100


def test_dead_letters_are_written_owner_only_whatever_the_umask(tmp_path, monkeypatch):
    """The file holds message bodies (tasks' arguments), as the broker's
    file does: it and the folders made for it are created owner-only, also
    after it is moved aside to ``.1``."""
    from offload import intake as intake_module
    from offload.intake import DeadLetters

    path = tmp_path / "data" / "dead-letters.jsonl"
    letters = DeadLetters(str(path))
    old_umask = os.umask(0)
    try:
        letters.record("a reason", task_id="t1", body=b'{"card": "4111"}')
        monkeypatch.setattr(intake_module, "DEAD_LETTERS_MAX_BYTES", 10)
        letters.record("another", task_id="t2", body=b"{}")  # past the size: the first moves to .1
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for written in (path, path.with_name(path.name + ".1")):
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["task_id"] == "t2"
    assert json.loads(path.with_name(path.name + ".1").read_text())["task_id"] == "t1"


def test_a_compression_the_app_uses_inflates_to_a_bound_only():
    from kombu import compression

    from offload.exceptions import RejectedMessage
    from offload.intake import limit_decompression

    saved = {name: (compression._encoders[name], compression._decoders[name])  # restored below
             for name in compression.encoders()}
    try:
        limit_decompression({"gzip"}, limit=1024 * 1024)
        assert compression.decompress(zlib.compress(b"x" * 1000), "application/x-gzip") == b"x" * 1000
        with pytest.raises(RejectedMessage, match="inflates past 1048576 bytes"):
            compression.decompress(bomb(64 * 1024 * 1024), "application/x-gzip")
        with pytest.raises(RejectedMessage, match="not one this app uses"):
            compression.decompress(b"BZh9", "application/x-bz2")
    finally:
        for name, (encoder, decoder) in saved.items():
            compression.register(encoder, decoder, name)


def test_a_task_that_kills_its_pool_process_is_dead_lettered_after_three_deaths(intake, tmp_path):
    from testapp.hostile import die

    off, worker, queue = intake
    runs = tmp_path / "runs"
    poison = off.options(queue=queue).submit(die, str(runs))
    # The other pool process keeps serving while the poison one is respawned.
    others = [off.options(queue=queue).submit(add, i, i) for i in range(5)]
    assert [f.result(timeout=60) for f in others] == [0, 2, 4, 6, 8]
    error = poison.exception(timeout=90)
    from offload.exceptions import RejectedMessage

    assert isinstance(error, RejectedMessage) and "died running it 3 times" in str(error), worker.log_tail()
    assert len(os.listdir(runs)) == 3
    assert worker.proc.poll() is None
    assert any(entry["task_id"] == poison.id for entry in dead_letters(off))
    assert off.options(queue=queue).submit(add, 1, 2).result(timeout=60) == 3


def test_sys_exit_in_a_submitted_function_fails_the_call_not_the_process(intake):
    from testapp.hostile import leave

    off, worker, queue = intake
    error = off.options(queue=queue).submit(leave, 3).exception(timeout=60)
    assert isinstance(error, RuntimeError) and "sys.exit(3)" in str(error)
    assert off.options(queue=queue).submit(add, 1, 2).result(timeout=60) == 3


def test_the_payload_bound_walks_without_recursion():
    from offload.intake import payload_error

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert payload_error(deep) == "the arguments nest deeper than 100 levels"
    assert payload_error([[1, {"a": [2.5]}]]) is None
    assert "non-finite" in payload_error([{"a": [float("nan")]}])


def test_a_registered_task_that_exits_its_pool_process_is_given_up_after_three(intake):
    # Through Celery's own path (not the dispatcher): sys.exit() ends the pool process.
    from offload.exceptions import RejectedMessage

    off, worker, queue = intake
    poison = off.celery.tasks["testapp.leave"].apply_async((0,), queue=queue)
    with pytest.raises(RejectedMessage, match="died running it 3 times"):
        poison.get(timeout=90)
    assert worker.proc.poll() is None
    assert off.options(queue=queue).submit(add, 1, 2).result(timeout=60) == 3
