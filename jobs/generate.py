"""``unclip generate`` / ``python -m jobs.generate``: batch generation on Ray Data.

    unclip generate captions.txt samples_per_caption=4 concurrency=2
    ray job submit -- python -m jobs.generate --config configs/generate/tiny.yaml root=s3://b/unclip

Reads a caption file (one caption per line), generates every row with an actor pool holding the
cascade (a GPU per actor when the cluster has GPUs), and writes ``<output>/images/<key>.png`` and
``<output>/index.parquet`` (key, caption, seed, path).
"""

import sys

from jobs.entry import main_of

main = main_of("generate")

if __name__ == "__main__":
    sys.exit(main())
