
# --- added by tests/test_django.py --------------------------------------------------
import os as _os

INSTALLED_APPS += ["django_tasks", "offload.django", "shop"]

TASKS = {
    "default": {"BACKEND": "offload.django.TaskBackend", "QUEUES": ["default", "emails"],
                "OPTIONS": {"expose": True}},
    "on_commit": {"BACKEND": "offload.django.TaskBackend", "OPTIONS": {"enqueue_on_commit": True}},
}

if _os.environ.get("SHOP_BROKER"):
    CELERY_BROKER_URL = _os.environ["SHOP_BROKER"]

if _os.environ.get("SHOP_DATABASE") == "postgresql":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql", "NAME": "test", "USER": "postgres",
        "HOST": "127.0.0.1", "PORT": 5432,
        "OPTIONS": {"options": f"-c search_path={_os.environ['SHOP_SCHEMA']}"},
    }}
    if _os.environ.get("SHOP_APP_NAME"):
        DATABASES["default"]["OPTIONS"]["application_name"] = _os.environ["SHOP_APP_NAME"]
