"""fleetctl: the operator's command line, assembled from one module per command group.

The groups: keys (`keys`), operators and audit (`admin`), bundle (`bundle`), token (`tokens`),
devices (`devices`), telemetry (`telemetry`), rollout (`rollout`); the top-level commands
deploy and undeploy (`deploy`), serve, retire-replica and demo (`serve`). This module puts them
together into the typer app the ``fleetctl`` console script runs, and keeps the parser of
``--selector`` options the groups share.
"""

from __future__ import annotations

import typer

from edgefleet.controlplane.cli import deploy, serve
from edgefleet.controlplane.cli.admin import audit_app, operators_app
from edgefleet.controlplane.cli.bundle import bundle_app
from edgefleet.controlplane.cli.common import fail
from edgefleet.controlplane.cli.devices import devices_app
from edgefleet.controlplane.cli.keys import keys_app
from edgefleet.controlplane.cli.rollout import rollout_app
from edgefleet.controlplane.cli.telemetry import telemetry_app
from edgefleet.controlplane.cli.tokens import token_app
from edgefleet.protos.fleet import selectors

app = typer.Typer(help="Operate an edgefleet: keys, bundles, devices, deployments.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(operators_app, name="operators")
app.add_typer(audit_app, name="audit")
app.add_typer(bundle_app, name="bundle")
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")
app.add_typer(telemetry_app, name="telemetry")
app.add_typer(rollout_app, name="rollout")
app.command()(serve.serve)
app.command("retire-replica")(serve.retire_replica)
app.command()(deploy.deploy)
app.command()(deploy.undeploy)
app.command()(serve.demo)


def parse_selector(items: list[str] | None) -> dict[str, str]:
    """Repeated or comma-separated KEY=VALUE items ("hw=jetson,site=a") as one label selector."""
    try:
        return selectors.parse(items)
    except selectors.NotKeyValue as exc:
        raise fail(str(exc)) from exc


if __name__ == "__main__":
    app()
