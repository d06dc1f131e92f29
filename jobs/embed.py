"""``unclip embed`` / ``python -m jobs.embed``: CLIP embeddings of the shards into the store.

``--import-clip-retrieval URL`` imports a clip-retrieval output folder into the same store instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.entry import Stage, run_stage
from pipeline import cluster
from pipeline.stage_config import EmbedConfig
from pipeline.storage import Storage


def run(cfg: EmbedConfig) -> int:
    from pipeline import embed

    storage = Storage(cfg.storage)
    storage.check(cfg.url(cfg.store), write=True)
    if cfg.import_clip_retrieval:
        from pipeline import clip_retrieval

        summary = clip_retrieval.import_folder(cfg, storage)
        print(
            f"import: {summary['rows']} rows from {cfg.import_clip_retrieval} "
            f"({summary['skipped']} skipped) into {summary['store']}"
        )
        return 0
    cluster.connect(cfg.ray)
    print(embed.embed_summary_line(embed.run_embedding(cfg, storage)))
    return 0


STAGE = Stage(
    "embed",
    "CLIP image and text embeddings of the shards into the embedding store (Ray Data)",
    EmbedConfig,
    "embed/tiny.yaml",
    run,
    flags=(
        (
            "--import-clip-retrieval",
            "import_clip_retrieval={}",
            "import a clip-retrieval output folder (img_emb/, text_emb/, metadata/) instead",
        ),
    ),
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.embed") -> int:
    return run_stage(STAGE, argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
