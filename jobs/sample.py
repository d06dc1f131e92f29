"""``unclip sample`` / ``python -m jobs.sample``: text → image with trained checkpoints (section 2).

    unclip sample "a red circle" "a blue square" samples_per_prompt=2 seed=1

Writes each image as ``<output>/<index>_<slug>.png``, a captioned ``grid.png`` and ``index.json``.
"""

import sys

from jobs.entry import main_of

main = main_of("sample")

if __name__ == "__main__":
    sys.exit(main())
