"""fleetctl: the operator's command line.

One module per command group (`main` holds the app and the smaller groups; `admin`, `bundle`,
`keys`, `rollout`), the client helpers (`client`), tables (`tables`), the demo (`demo`) and the
child processes it runs (`child_process`). The top layer: may import any control-plane package.
"""
