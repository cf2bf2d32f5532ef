"""The control plane: the operator side of edgefleet.

Packages by job, each importing only the layers below it:

- `app`: wiring and lifecycle (start/stop, settings, periodic upkeep, collector tuning);
- `api`: the gRPC servicers, thin: auth, guard and the one error map, device and operator RPCs;
- `fleet`: fleet domain rules shared by the RPCs: audit trail, operator roles, change notices;
- `rollouts`: wave-by-wave, health-gated releases, driven by one leader;
- `trust`: keys, the two TUF repositories, the fleet CA, CRL, revocation, TLS;
- `telemetry`: MQTT ingestion, record shapes, retention, exporter, replica retirement, the
  embedded broker;
- `store`: the database (models, migrations, queries) and the content-addressed blob store;
- `build`: the publisher's side: bundles, archive packing, GGUF headers, the quantization ladder;
- `cli`: fleetctl, its client helpers and tables, the demo.

`store` imports no other control-plane package; `api` is the only one that implements gRPC
servicers; nothing here imports `edgefleet.agent`.
"""
