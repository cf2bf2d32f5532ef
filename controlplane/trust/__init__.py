"""What devices and operators trust, and how the control plane keeps it.

Signing keys and roots (`keys`), the Uptane image and director repositories (`repositories`),
the fleet TLS certificate authority (`ca`), its revocation list (`crl`), what revoking a device
does beyond the database (`revocation`) and the TLS of both gRPC listeners (`tls`). Imports
`store` and `edgefleet.protos`.
"""
