"""``unclip config <stage> [--config FILE] [overrides]``: check a stage's config and print it resolved.

Useful before submitting a job: the same loader and checks run as in the job itself.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from jobs.commands import stages
from jobs.entry import run_stage


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.show_config") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    known = stages()
    if not args or args[0] in ("-h", "--help") or args[0] not in known:
        stream = sys.stdout if not args or args[0] in ("-h", "--help") else sys.stderr
        if args and stream is sys.stderr:
            print(f"{prog}: unknown stage {args[0]!r}", file=stream)
        print(f"usage: {prog} <stage> [--config FILE] [key.sub=value ...]", file=stream)
        print("stages: " + ", ".join(known), file=stream)
        return 0 if stream is sys.stdout else 2
    name = args[0]
    checking = dataclasses.replace(
        known[name], summary=f"check the {name} config", description="", run=None
    )
    return run_stage(checking, args[1:], prog=f"{prog} {name}")


if __name__ == "__main__":
    sys.exit(main())
