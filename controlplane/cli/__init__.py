"""fleetctl: the operator's command line.

One module per command group: `keys`, `admin` (operators, audit), `bundle`, `tokens`, `devices`,
`telemetry`, `rollout`, `deploy` (deploy, undeploy) and `serve` (serve, retire-replica, demo);
`main` only assembles them into the typer app. Beside them the options and error output every
group shares (`common`), the client helpers (`client`), tables (`tables`), the demo (`demo`)
and the child processes it runs (`child_process`). The top layer: may import any control-plane
package, and none imports it.
"""
