"""Where the store keeps its data: environment-only configuration.

``BATCHLAB_HOME`` (default ``./.batchlab``) holds the SQLite database, checkpoints and
caches; ``BATCHLAB_DATABASE_URL`` overrides the database (SQLite or PostgreSQL).
"""

from __future__ import annotations

import os
from pathlib import Path

# SQLAlchemy picks psycopg2 for a bare "postgresql://"; the project ships psycopg 3.
_PG_PREFIXES = ("postgresql://", "postgres://")
_PG_DRIVER = "postgresql+psycopg://"


def home() -> Path:
    """``$BATCHLAB_HOME`` or ``./.batchlab``, created when missing."""
    path = Path(os.environ.get("BATCHLAB_HOME") or ".batchlab").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def normalize_url(url: str) -> str:
    """Map plain PostgreSQL URLs (``postgresql://``, ``postgres://``) to psycopg 3."""
    for prefix in _PG_PREFIXES:
        if url.startswith(prefix):
            return _PG_DRIVER + url[len(prefix) :]
    return url


def database_url() -> str:
    """``$BATCHLAB_DATABASE_URL`` or ``sqlite:///$BATCHLAB_HOME/batchlab.db``."""
    url = os.environ.get("BATCHLAB_DATABASE_URL")
    if url:
        return normalize_url(url)
    return f"sqlite:///{(home() / 'batchlab.db').resolve()}"
