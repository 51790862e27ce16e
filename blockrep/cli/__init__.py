"""The ``blockrep`` command line."""

from __future__ import annotations

import sys

USAGE = """usage: blockrep COMMAND [ARGS...]

commands:
  daemon    the block daemon: QEMU-style -drive/-blockdev, QMP, NBD server and exports
  img       image utility (qemu-img forms): create, info, check, map, compare, convert
"""


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `blockrep img map | head` ends quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "daemon":
        from ..daemon import main as daemon_main

        return daemon_main(rest)
    if cmd == "img":
        from .img import main as img_main

        return img_main(rest)
    if cmd in ("--version", "version"):
        from .. import __version__

        print(f"blockrep {__version__}")
        return 0
    print(f"blockrep: unknown command '{cmd}'\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
