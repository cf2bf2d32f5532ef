"""What the device is: its identity, TLS key and certificate, channels and hardware.

Enrollment identity (`identity`), the P-256 key, CSR and certificate (`tls`), the gRPC channels
to the control plane (`channel`) and hardware detection (`hardware`, `hardware_profile`).
Imports only `edgefleet.protos`.
"""
