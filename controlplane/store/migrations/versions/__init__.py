"""The revisions, oldest first by their zero-padded ids (Alembic skips this file)."""
