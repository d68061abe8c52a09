"""Pipelines: several recipes run in sequence, each stage leaving its model in the run directory."""
