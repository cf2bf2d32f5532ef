"""Fleet domain rules and commands the API and the rollout engine share.

The domain commands, each one transaction that makes a change, re-signs what it affects and
records it in the hash-chained audit trail (`audit`): deploying and undeploying (`deployments`),
pins and labels (`pins`), revoking devices (`devices`), tokens, operators and roots (`access`),
publishing bundles and image targets (`bundles`). Beside them: operator roles and token hashes
(`rbac`), signing a device's director targets (`director`), the commands' own refusals
(`errors`) and the notices that wake devices whose desired state changed (`notifier`).
Imports `store`, `trust` and `edgefleet.protos`; no gRPC: refusals are typed exceptions the
API maps to status codes.
"""
