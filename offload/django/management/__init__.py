"""Django management commands of offload: ``manage.py offload ...`` (:mod:`.commands.offload`)."""
