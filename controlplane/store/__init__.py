"""The control plane's store: the database and the blob store.

SQLModel tables (`models`), Alembic migrations (`migrate`, `migrations/`), engine set-up
(`engine`), keyword-only queries and commands (`crud`, `telemetry`) and content-addressed
artifact storage (`blobs`). The bottom layer: imports no other control-plane package.
"""
