"""The publisher's side: what `fleetctl bundle build` makes before anything is pushed.

Signed bundles on disk (`bundles`), folder variants packed into one deterministic tar
(`archive_pack`), GGUF header reading (`gguf_info`) and the quantization ladder (`ladder`).
Runs on the operator's machine; imports `trust` for keys and `edgefleet.protos`.
"""
