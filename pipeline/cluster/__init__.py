"""Ray clusters: connecting to one (``connect``), submitting commands as Ray jobs (``submit``), and
the stall watchdog for the Ray Data pipelines a driver consumes (``watchdog``)."""
