"""The one package ``testapp.guarded`` allows: functions, and things that are not."""

from __future__ import annotations

import functools
import os
import sys


def loaded(names):
    """Which of ``names`` the worker has imported."""
    return {name: name in sys.modules for name in names}


class Runner:
    """A class: a forged message naming it must not construct it."""

    def __init__(self, path):
        with open(path, "w") as out:
            out.write("constructed")


class Jobs:
    @staticmethod
    def double(x):
        return 2 * x

    def plain(self, path):
        """A plain method: a message could only run it with a forged ``self``."""
        with open(path, "w") as out:
            out.write(f"ran with self={self!r}")

    @classmethod
    def name(cls):
        return cls.__name__


@functools.lru_cache(maxsize=None)
def cached_square(x):
    """A callable object, not a function: a worker does not run it by reference."""
    return x * x


getcwd = os.getcwd  # a builtin of the standard library, reachable from here
