"""Alembic migrations of the control plane's database: ``env.py`` and ``versions/``.

A package so the revisions ship with ``controlplane`` and are type-checked like the rest;
``edgefleet.controlplane.store.migrate`` runs them,
``python -m edgefleet.controlplane.store.migrations`` writes new ones.
"""
