"""``unclip train-prior`` / ``python -m jobs.train_prior``: train the prior (text → CLIP image embedding) on the embedding store."""

import sys

from jobs.entry import main_of

main = main_of("train-prior")

if __name__ == "__main__":
    sys.exit(main())
