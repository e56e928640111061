"""``python -m offload.demo [--host H] [--port P] [--data-dir DIR] [--keep-ledger]``."""

from __future__ import annotations

import argparse

from . import run


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m offload.demo",
        description="The ledger demo: a WSGI app and a local worker on the embedded broker.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="folder for the broker, results and ledger "
                             "(default: $OFFLOAD_DEMO_DATA_DIR or a per-user temp folder)")
    parser.add_argument("--keep-ledger", action="store_true",
                        help="keep the ledger of the last run (default: start on an empty one)")
    options = parser.parse_args(argv)
    try:
        run(options.host, options.port, data_dir=options.data_dir, keep_ledger=options.keep_ledger)
    except OSError as exc:
        parser.exit(1, f"error: {exc.strerror or exc}\n")


if __name__ == "__main__":
    main()
