"""``unclip generate`` / ``python -m jobs.generate``: batch generation on Ray Data.

    unclip generate captions.txt samples_per_caption=4 concurrency=2
    ray job submit -- python -m jobs.generate --config configs/generate/tiny.yaml root=s3://b/unclip

Reads a caption file (one caption per line), generates every row with an actor pool holding the
cascade (a GPU per actor when the cluster has GPUs, ``batch_size`` rows per cascade call), and
writes ``<output>/job.json``, ``<output>/images/<key>.png``, an index part per batch under
``<output>/index/`` and, once every row is done, ``<output>/index.parquet`` (key, caption, seed,
path). A rerun generates only the missing rows; another job into the same output is refused.
"""

import sys

from jobs.entry import main_of

main = main_of("generate")

if __name__ == "__main__":
    sys.exit(main())
