"""The control plane's store: SQLModel tables and keyword-only CRUD functions."""
