"""What a run writes for humans, all redacted: logs, metrics, reports, image grids."""
