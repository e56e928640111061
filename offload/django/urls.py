"""``path("offload/", include("offload.django.urls"))``: the task API under ``/offload/``.

With :func:`offload.django.views.default_authorize`; for other options
mount :func:`offload.django.views.task_api_view` yourself::

    api = task_api_view(authorize=my_rule, cors_origins=["https://app.example"])
    urlpatterns = [re_path(r"^offload/(?P<subpath>.*)$", api)]
"""

from __future__ import annotations

from django.urls import re_path

from .views import task_api_view

app_name = "offload"

urlpatterns = [re_path(r"^(?P<subpath>.*)$", task_api_view(), name="api")]
