"""Set Django up and hold the project's Offload: what worker processes import.

Local workers (``off.start()``, ``manage.py offload cluster``) run
``celery -A offload._boot:app worker`` with ``OFFLOAD_APP`` naming this
module's ``off``; ``offload --app offload.django.boot worker`` works the
same from a shell where ``DJANGO_SETTINGS_MODULE`` is set.
"""

from __future__ import annotations

import os

import django
from django.apps import apps

if not os.environ.get("DJANGO_SETTINGS_MODULE"):
    from ..exceptions import ConfigurationError

    raise ConfigurationError("offload.django.boot needs DJANGO_SETTINGS_MODULE (e.g. mysite.settings)")
if not apps.ready:
    django.setup()

from . import get_offload  # noqa: E402

off = get_offload()
