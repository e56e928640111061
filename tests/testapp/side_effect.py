"""Outside ``testapp.guarded``'s allow-list; importing it leaves a marker file."""

import os

open(os.path.join(os.environ.get("OFFLOAD_TEST_DATA_DIR", "/tmp/offload-tests"), "side-effect-imported"), "w").close()


def fn():
    return "ran"
