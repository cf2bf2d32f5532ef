"""Wiring and lifecycle of a control-plane process.

Owns start-up and shutdown (`server`: store, broker, ingestion, exporter, both gRPC listeners,
periodic upkeep, the rollout engine, each stopped in reverse order through one exit stack),
what makes those stops safe (`lifetime`: the gRPC server's ports, background tasks), the
periodic upkeep jobs (`upkeep`), the one settings object and the collector tuning of a
long-running server. May import every other control-plane package except `cli`; nothing but
`cli` imports it.
"""
