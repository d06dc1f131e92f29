"""Image-text shards: their layout (``shards``), ingestion from URL lists (``ingest``), and the
synthetic captioned-shapes dataset (``shapes`` draws scenes, ``synth`` writes them as shards,
``shape_checker`` reads them back from pixels)."""
