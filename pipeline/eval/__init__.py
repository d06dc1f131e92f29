"""``unclip eval``: the run (``run``), its report (``report``) and the metrics (``metrics``)."""
