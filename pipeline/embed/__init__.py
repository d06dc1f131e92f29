"""CLIP embeddings: loading open_clip (``clip_model``), the Ray Data job that encodes shards
(``job``), the embedding store it writes (``store``), and the clip-retrieval import
(``clip_retrieval``)."""
