"""flexjob's job runner: job store, worker loop, Parquet I/O, dashboard and the `flexjob` CLI."""
