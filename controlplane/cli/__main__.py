"""`python -m edgefleet.controlplane.cli`: fleetctl without its console script."""

from edgefleet.controlplane.cli.main import app

app()
