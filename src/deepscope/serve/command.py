"""``deepscope serve [FOLDER]``: label images in the browser (see :mod:`deepscope.serve.app`)."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.serve.app import serve

    serve(args.folder, host=args.host, port=args.port)
    return {"served": str(args.folder)}


def add_command(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="label images in the browser: paint classes, see a live pixel classifier's predictions"
    )
    serve.add_argument(
        "folder", nargs="?", default=".", help="folder of images (or with images/); labels are saved in FOLDER/labels"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any but the loopback requires the token printed at start",
    )
    serve.set_defaults(func=run)
