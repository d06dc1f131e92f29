"""``unclip variations`` / ``python -m jobs.variations``: variations of images (section 3.1).

    unclip variations photo.png num=6 eta=1.0

Keeps each image's CLIP image embedding and decodes it with DDIM η > 0; writes the variations,
a grid (the input first in each row) and ``index.json`` under ``<output>``.
"""

import sys

from jobs.entry import main_of

main = main_of("variations")

if __name__ == "__main__":
    sys.exit(main())
