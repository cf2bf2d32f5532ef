"""The gRPC API: servicers only, thin.

Each RPC authenticates (`auth`), checks its request against the general bounds (`limits`),
runs one domain command and maps any refusal to a status through the one error table
(`refusals`, applied to every method by `guard`). Device calls (`device_service`); operator
calls (`operator_service`, composed of one module per RPC family: `bundles`, `fleet`,
`access`, `telemetry`, `rollouts`, over `operator_parts`); paging (`pages`) and the per-peer
rate limit for strangers (`ratelimit`, `refusal_log`). The only package that implements
servicer bases; it imports the domain (`fleet`, `rollouts`, `trust`, `telemetry`, `store`),
never `app` or `cli`.
"""
