"""``python -m pyramid_ledger``: the app on http://127.0.0.1:8000 (waitress)."""

import argparse

from waitress import serve

from pyramid_ledger import configure


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyramid_ledger", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    serve(configure().make_wsgi_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
