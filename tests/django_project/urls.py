from django.contrib import admin
from django.urls import include, path

from shop import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("enqueue/<str:name>", views.enqueue),
    path("result/<str:result_id>", views.result),
    path("rollback", views.note_then_rollback),
    path("offload/", include("offload.django.urls")),
]
