"""Fleet domain rules the API and the rollout engine share.

The hash-chained audit trail, operator roles and tokens, and the notices that wake devices
whose desired state changed. Imports `store` and `edgefleet.protos`; no gRPC servicer code.
"""
