"""``unclip eval`` / ``python -m jobs.eval``: the decoder's conditionings compared (DALL-E 2
section 5.1, figure 7): caption only, the CLIP text embedding without a prior, and the prior(s).

    unclip eval num_prompts=64 inception_weights=/data/inception_v3_google-0cc3c7bd.pth

Writes ``report.json``, ``report.md``, ``metrics.png`` and one ``grid_<conditioning>.png`` per
conditioning under ``<root>/<output>/``.
"""

import sys

from jobs.entry import main_of

main = main_of("eval")

if __name__ == "__main__":
    sys.exit(main())
