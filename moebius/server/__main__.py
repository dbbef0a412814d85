"""``python -m moebius.server MODEL_DIR [--ranks N --layout tp|ep|auto --port P ...]``: the same
server, with the same flags, as ``moebius serve``."""

from __future__ import annotations

import sys

from moebius.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
