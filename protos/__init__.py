"""The wire contract (fleet/v1/*.proto and the code generated from it) and the code both
sides need: release verification, Uptane naming, topics, device configs, atomic files.

Imports neither `edgefleet.agent` nor `edgefleet.controlplane`.
"""
