"""The device's update path: from a desired state to a verified, installed, serving release.

Uptane verification (`uptane_client`), the variant choice (`selection`), resumable verified
downloads (`artifacts`), safe archive extraction (`archive`), the persisted state
(`state`) and the lifecycle that drives them (`updater`), with its typed errors (`errors`).
Imports `device`, `runtimes` and `edgefleet.protos`; never `api`.
"""
