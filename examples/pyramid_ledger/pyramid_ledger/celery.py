"""The Celery app, for ``celery -A pyramid_ledger worker -l INFO``."""

from pyramid_ledger import configure

app = configure().make_celery_app()
