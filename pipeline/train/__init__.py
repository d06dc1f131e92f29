"""Stage training on Ray Train: the driver (``driver``), the per-worker loop (``loop``), what differs
between stages (``stages``) and their checkpoints (``checkpoints``)."""
