"""An app that allows one subpackage (``testapp.allowed``) and one decorated task.

Forged messages are sent to its worker: everything in ``testapp`` outside
``testapp.allowed`` is outside its allow-list, except what ``@off.task``
registers here.
"""

from __future__ import annotations

import os

from testapp import Offload, settings, test_id

off = Offload({
    **settings("embedded"),
    "OFFLOAD_DATA_DIR": os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"),
                                     test_id(), "guarded"),
    "OFFLOAD_ALLOW": ["testapp.allowed"],
})
celery = off.celery


@off.task
def decorated(x):
    """Outside the allow-list's packages: allowed only because it is registered."""
    return x * 10
