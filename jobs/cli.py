"""``unclip``: one console script for every stage; ``unclip <stage> --help`` for each.

Each stage is also a module, ``python -m jobs.<module>``, which is what ``ray job submit`` runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command → (module under jobs/, one line of help). Modules import lazily: `unclip --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "the whole pipeline on the built-in tiny config, on this machine"),
    "synth": ("synth", "write the synthetic captioned-shapes dataset as webdataset shards"),
    "ingest": ("ingest", "download an image-text URL list into webdataset shards (img2dataset)"),
    "embed": ("embed", "CLIP image and text embeddings of the shards into the embedding store"),
    "train-clip": ("train_clip", "train (or fine-tune) an open_clip model on the shards"),
    "train-prior": ("train_prior", "train the prior: text → CLIP image embedding"),
    "train-decoder": ("train_decoder", "train the 64px decoder: CLIP image embedding → image"),
    "train-upsampler": ("train_upsampler", "train an upsampler: 64→256 or 256→1024"),
    "sample": ("sample", "text → image with trained checkpoints: PNGs, a captioned grid"),
    "variations": ("variations", "variations of an image (DALL-E 2 section 3.1)"),
    "interpolate": ("interpolate", "interpolations between two images (section 3.2)"),
    "textdiff": ("textdiff", "edit an image towards a caption with a text diff (section 3.3)"),
    "generate": ("generate", "batch generation of a caption file on Ray Data"),
    "eval": ("eval", "compare conditionings (section 5.1): CLIP score, FD, FID, accuracy"),
    "config": ("show_config", "check a stage's config and print it resolved"),
    "submit": ("submit", "run a command as a Ray job on a cluster and stream its logs"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: unclip <command> [INPUT ...] [--config FILE] [key.sub=value ...]",
        "",
        "Train DALL-E 2 (unCLIP) models on Ray. Commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
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
    module = importlib.import_module(f"jobs.{COMMANDS[command][0]}")
    return module.main(rest, prog=f"unclip {command}")


if __name__ == "__main__":
    sys.exit(main())
