"""An entry point inside an allowed package: importing it runs the program."""

import sys

from testapp.allowed.magic import marker

open(marker("main"), "w").close()


def x(*args):
    return "ran"


sys.exit(0)
