"""The control plane's store: the database and the blob store.

SQLModel tables (`models`), Alembic migrations (`migrate`, `migrations/`), engine set-up
(`engine`), keyword-only queries and commands by aggregate: enrollment and operator tokens
(`access`), devices and their certificates (`devices`), bundles (`bundles`), each device's
assigned releases, config and generation (`deployments`), variant pins (`pins`), labels
(`labels`), telemetry writes (`telemetry`) and reads (`telemetry_reads`); their refusals
(`errors`) and shared values (`values`); content-addressed artifact storage (`blobs`). The
bottom layer: imports no other control-plane package.
"""
