"""The device agent: verify what the control plane sends, serve it locally, report telemetry.

Packages: `tasks` (the process's parts: task supervision, the API server, the control-plane
loops, boot state, status, stop signals), `api` (OpenAI-compatible HTTP on the device),
`runtimes` (one adapter per backend behind one protocol, the model table, the memory budget),
`update` (Uptane verification, downloads, state and the update lifecycle), `device`
(identity, TLS, channels, hardware), `telemetry` (durable outbox and MQTT publisher).
`service` wires them into one process, `cli` is fleet-agent, `config` its settings, `errors`
the base of its errors. Never imports `edgefleet.controlplane`.
"""
