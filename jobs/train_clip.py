"""``unclip train-clip`` / ``python -m jobs.train_clip``: train (or fine-tune) an open_clip model contrastively on the shards."""

import sys

from jobs.entry import main_of

main = main_of("train-clip")

if __name__ == "__main__":
    sys.exit(main())
