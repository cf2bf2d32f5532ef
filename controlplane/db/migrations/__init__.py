"""Alembic migrations of the control plane's database: ``env.py`` and ``versions/``.

A package so the revisions ship with ``controlplane`` and are type-checked like the rest;
``controlplane.db.migrate`` runs them, ``python -m controlplane.db.migrations`` writes new ones.
"""
