"""``unclip textdiff`` / ``python -m jobs.textdiff``: edit images with a text diff (section 3.3).

    unclip textdiff cat.png --from "a photo of a cat" --to "a photo of a dog" max_theta=0.5

Rotates each image's CLIP image embedding towards normalize(z_t − z_t0) of the two captions and
decodes from its DDIM-inverted latent; writes the sweep, a grid (the input first in each row) and
``index.json`` under ``<output>``.
"""

import sys

from jobs.entry import main_of

main = main_of("textdiff")

if __name__ == "__main__":
    sys.exit(main())
