"""``manage.py offload ...``: offload's command line for this project.

The same click commands as ``offload`` (worker, cluster, beat, status,
inspect, flower and any added later, such as dashboard), with the
project's Offload. ``worker`` without ``-Q`` consumes every queue that a
``TASKS`` backend of offload lists in ``QUEUES``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand


def _backend_queues() -> list[str]:
    from django.conf import settings
    from django.utils.module_loading import import_string

    from offload.django.backend import TaskBackend

    queues: list[str] = []
    for alias, params in (getattr(settings, "TASKS", None) or {}).items():
        try:
            cls = import_string(params.get("BACKEND", ""))
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, TaskBackend):
            backend = cls(alias, params)
            queues += [backend.celery_queue(name) for name in sorted(backend.queues)]
    return list(dict.fromkeys(queues))


class Command(BaseCommand):
    help = "Run and watch offload's workers (worker, cluster, status, inspect, flower, ...)."

    def run_from_argv(self, argv: list[str]) -> None:
        # click parses the rest, as `offload ...` does.
        from offload import cli
        from offload.django import get_offload

        args = list(argv[2:])
        if args[:1] == ["worker"] and not any(a in ("-Q", "--queues") or a.startswith("--queues=")
                                               for a in args):
            try:
                queues = _backend_queues()
            except ImportError:  # no Tasks framework: offload's own queues only
                queues = []
            default = str(get_offload().celery.conf.task_default_queue)
            if set(queues) - {default}:
                args += ["--queues", ",".join(dict.fromkeys([default, *queues]))]
        group = cli.group_for(get_offload, name=f"{argv[0]} offload")
        group.main(args=args, prog_name=f"{argv[0]} offload")

    def handle(self, *args: Any, **options: Any) -> None:  # call_command(): click needs argv
        self.run_from_argv(["manage.py", "offload", *args])
