"""Evaluation building blocks: prompt sets, work sharding across ranks and array tasks, per-prompt sampling,
metric plug-ins and the report. `rcm.evaluate` (the CLI) puts them together."""
