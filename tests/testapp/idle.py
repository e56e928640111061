"""An app that never has a worker: its control exchange is its own."""

from offload import Offload
from testapp.local import local_settings

off = Offload(local_settings("idle"))
