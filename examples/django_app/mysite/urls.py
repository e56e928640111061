from django.urls import include, path

from reports import views

urlpatterns = [
    path("", views.index, name="index"),
    path("reports/<str:result_id>", views.follow, name="follow"),
    # offload's task API: /offload/tasks/<id>, its events, offload.js.
    path("offload/", include("offload.django.urls")),
]
