"""Wiring and lifecycle of a control-plane process.

Owns start-up and shutdown (store, broker, ingestion, both gRPC listeners, periodic upkeep),
the one settings object and the collector tuning of a long-running server. May import every
other control-plane package except `cli`; nothing but `cli` imports it.
"""
