"""The reader: raw steps -> totals, live comparison, snapshots, exporters (never in a worker)."""
