"""Generation from trained checkpoints: the cascade (``cascade``), the interactive commands
(``sampling``: sample, variations, interpolate, textdiff) and batch generation on Ray Data
(``batch``)."""
