"""``unclip train-upsampler`` / ``python -m jobs.train_upsampler``: train an upsampler (64→256 or 256→1024)."""

import sys

from jobs.entry import main_of

main = main_of("train-upsampler")

if __name__ == "__main__":
    sys.exit(main())
