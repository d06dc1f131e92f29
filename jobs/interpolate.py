"""``unclip interpolate`` / ``python -m jobs.interpolate``: between two images (section 3.2).

    unclip interpolate a.png b.png num=7 latent=inverted

Decodes slerps of the two images' CLIP image embeddings; writes each step, a grid (the two
inputs at its ends) and ``index.json`` under ``<output>``.
"""

import sys

from jobs.entry import main_of

main = main_of("interpolate")

if __name__ == "__main__":
    sys.exit(main())
