"""The device's update path: from a desired state to a verified, installed, serving release.

Uptane verification (`uptane_client`), the variant choice (`selection`), resumable verified
downloads (`artifacts`, from HTTP mirrors then the control plane: `sources`, `mirrors`), safe
archive extraction (`archive`), the persisted state (`state`), the lifecycle as a transition
table with its crash-loop breaker (`lifecycle`), what a generation will do (`planning`), the
steps that change what serves (`steps`) and the updater that orders them (`updater`), with its
two error families, refusals and transient failures (`errors`). Imports `device`, `runtimes` and
`edgefleet.protos`; never `api`.
"""
