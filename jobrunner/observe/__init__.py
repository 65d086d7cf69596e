"""Watching jobs: the status snapshot, the live dashboard, the report plot."""
