"""Data in and out: input files, result parts, merged results, enqueue."""
