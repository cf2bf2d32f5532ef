"""Device telemetry: a durable outbox, an MQTT publisher draining it, and a recording facade.

Typical wiring in the agent::

    outbox = Outbox(state_dir / "telemetry.sqlite3")
    publisher = TelemetryPublisher(device_id=device_id, broker_url=url, outbox=outbox)
    telemetry = Telemetry(device_id=device_id, outbox=outbox, nudge=publisher.nudge)
    publisher.start()
"""

from edgefleet.agent.telemetry.outbox import Outbox, OutboxCorruptError, OutboxError, OutboxItem
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.agent.telemetry.recorder import Telemetry

__all__ = [
    "Outbox",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxItem",
    "Telemetry",
    "TelemetryPublisher",
]
