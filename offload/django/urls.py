"""``path("offload/", include("offload.django.urls"))``: the task API under ``/offload/``.

With :func:`offload.django.views.default_authorize`; for other options
mount :func:`offload.django.views.task_api_view` yourself::

    api = task_api_view(authorize=my_rule, cors_origins=["https://app.example"])
    urlpatterns = [path("offload/", include(urlpatterns_for(api)))]

The dashboard (``/offload/dashboard``, staff only) is served too.
"""

from __future__ import annotations

from .views import task_api_view, urlpatterns_for

app_name = "offload"

urlpatterns = urlpatterns_for(task_api_view())
