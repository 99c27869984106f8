"""The stage-3 recipe parts: frozen encoders, the objective, bucketed batches, resolution schedule, export and sampling."""
