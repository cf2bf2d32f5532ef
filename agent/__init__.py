"""The device agent: verify what the control plane sends, serve it locally, report telemetry.

Packages: `api` (OpenAI and Ollama-style HTTP on the device), `runtimes` (one adapter per
backend behind one protocol, the model table, the memory budget), `update` (Uptane
verification, downloads, state and the update lifecycle), `device` (identity, TLS, channels,
hardware), `telemetry` (durable outbox and MQTT publisher). `service` wires them into one
process, `cli` is fleet-agent, `config` its settings. Never imports `edgefleet.controlplane`.
"""
