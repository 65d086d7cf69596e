"""A throw-away PostgreSQL schema, so tests and benchmarks never touch the database's own tables."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def scratch_schema(server_url: str, prefix: str = "fjtest") -> Iterator[str]:
    """Create a schema, yield a URL whose search_path is that schema, drop it afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{server_url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
