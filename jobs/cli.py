"""``unclip``: one console script for every stage; ``unclip <stage> --help`` for each.

Each stage is also a module, ``python -m jobs.<module>``, which is what ``ray job submit`` runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from jobs.commands import COMMANDS


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: unclip <command> [INPUT ...] [--config FILE] [key.sub=value ...]",
        "",
        "Train DALL-E 2 (unCLIP) models on Ray. Commands:",
        *(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()),
        "",
        "'unclip <command> --help' for a command's options, '--help-config' for its config keys.",
        "Each command also runs as 'python -m jobs.<module>' (for 'ray job submit').",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"unclip: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{COMMANDS[command].module}")
    return module.main(rest, prog=f"unclip {command}")


if __name__ == "__main__":
    sys.exit(main())
