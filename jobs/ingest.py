"""``unclip ingest`` / ``python -m jobs.ingest``: an image-text URL list into webdataset shards."""

import sys

from jobs.entry import main_of

main = main_of("ingest")

if __name__ == "__main__":
    sys.exit(main())
