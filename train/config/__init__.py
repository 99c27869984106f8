"""Typed config: the schema of conf/ split by section, loading and override checks, the reference generator. The ground level: imports nothing else from train/."""
