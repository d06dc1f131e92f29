"""``unclip embed`` / ``python -m jobs.embed``: CLIP embeddings of the shards into the store.

``--import-clip-retrieval URL`` imports a clip-retrieval output folder into the same store instead.
"""

import sys

from jobs.entry import main_of

main = main_of("embed")

if __name__ == "__main__":
    sys.exit(main())
