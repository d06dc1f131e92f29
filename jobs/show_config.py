"""``unclip config <stage> [--config FILE] [overrides]``: check a stage's config and print it resolved.

Useful before submitting a job: the same loader and checks run as in the job itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage
from pipeline.stage_config import STAGE_CONFIGS


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.show_config") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in STAGE_CONFIGS:
        stream = sys.stdout if not args or args[0] in ("-h", "--help") else sys.stderr
        if args and stream is sys.stderr:
            print(f"{prog}: unknown stage {args[0]!r}", file=stream)
        print(f"usage: {prog} <stage> [--config FILE] [key.sub=value ...]", file=stream)
        print("stages: " + ", ".join(STAGE_CONFIGS), file=stream)
        return 0 if stream is sys.stdout else 2
    name = args[0]
    config_cls, folder = STAGE_CONFIGS[name]
    stage = Stage(name, f"check the {name} config", config_cls, f"{folder}/tiny.yaml")
    return run_stage(stage, args[1:], prog=f"{prog} {name}")


if __name__ == "__main__":
    sys.exit(main())
