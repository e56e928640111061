"""The ``offload`` management command (``manage.py offload worker|cluster|status|...``)."""
