"""Reproducible benchmark scripts (run as ``python bench/<name>.py``) and what they share
(``bench.measure``). Not part of the installed package."""
