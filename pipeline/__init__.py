"""The data side and the Ray glue of unclip (docs/ARCHITECTURE.md has the module map)."""

import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The checkout (or installed tree) holding ``pipeline/`` and ``configs/``: relative config paths
fall back to it where the working directory differs (a Ray worker, an installed image)."""
