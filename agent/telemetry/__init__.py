"""Device telemetry: a durable outbox, an MQTT publisher draining it, and a recording facade.

Typical wiring in the agent::

    outbox = Outbox(state_dir / "telemetry.sqlite3")
    publisher = TelemetryPublisher(device_id=device_id, broker_url=url, outbox=outbox)
    telemetry = Telemetry(device_id=device_id, outbox=outbox, nudge=publisher.nudge)
    publisher.start()
"""

from agent.telemetry.outbox import Outbox, OutboxCorruptError, OutboxError, OutboxItem
from agent.telemetry.publisher import TelemetryPublisher
from agent.telemetry.recorder import Telemetry

__all__ = [
    "Outbox",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxItem",
    "Telemetry",
    "TelemetryPublisher",
]
