"""``unclip train-decoder`` / ``python -m jobs.train_decoder``: train the 64px decoder (CLIP image embedding → image)."""

import sys

from jobs.entry import main_of

main = main_of("train-decoder")

if __name__ == "__main__":
    sys.exit(main())
