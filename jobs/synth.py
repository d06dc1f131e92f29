"""``unclip synth`` / ``python -m jobs.synth``: write the captioned-shapes dataset as shards."""

import sys

from jobs.entry import main_of

main = main_of("synth")

if __name__ == "__main__":
    sys.exit(main())
