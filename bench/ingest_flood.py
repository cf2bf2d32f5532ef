"""What a flood of maximum-size telemetry messages makes the control plane's ingestor hold.

    python -m bench.ingest_flood [--messages 400] [--oversized 40]

A child process publishes ``--messages`` messages of MAX_RECORDS_PER_MESSAGE heartbeat records
each, padded to just under MAX_MESSAGE_BYTES, and ``--oversized`` messages 32 KiB over it, at
QoS 1 to a Mosquitto of our own without a packet limit (so the ingestor's own check is what
refuses the oversized ones; anything beyond the Maximum Packet Size the ingestor announces,
MAX_MESSAGE_BYTES + 64 KiB, the broker drops for it), while the ingestor is away; then the
real ingestor (SQLite) drains that backlog. This process's RSS is sampled every 20 ms: before
the ingestor starts, and its peak while draining. Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.services import start_broker
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.telemetry.decode import MAX_MESSAGE_BYTES
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor
from edgefleet.controlplane.telemetry.record_shape import MAX_RECORDS_PER_MESSAGE
from edgefleet.protos.fleet.topics import TopicKind, telemetry_topic

CLIENT_ID = "edgefleet-controlplane-flood"


def max_size_message(device_id: str, first_seq: int) -> bytes:
    """MAX_RECORDS_PER_MESSAGE heartbeats padded to just under MAX_MESSAGE_BYTES."""
    head = [
        {"schemaVersion": 1, "deviceId": device_id, "seq": str(first_seq + i), "variant": ""}
        for i in range(MAX_RECORDS_PER_MESSAGE)
    ]
    bare = len(json.dumps(head).encode())
    pad = (MAX_MESSAGE_BYTES - bare - 64) // MAX_RECORDS_PER_MESSAGE
    for record in head:
        record["variant"] = "v" * pad
    payload = json.dumps(head).encode()
    assert len(payload) <= MAX_MESSAGE_BYTES
    return payload


def publish(url: str, messages: int, oversized: int) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood", protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(20)
    client.connect(host, int(port))
    client.loop_start()
    devices = [f"flood-{n:02d}" for n in range(20)]
    infos = []
    for n in range(messages):
        device = devices[n % len(devices)]
        payload = max_size_message(device, 1 + (n // len(devices)) * MAX_RECORDS_PER_MESSAGE)
        infos.append(client.publish(telemetry_topic(device, TopicKind.HEARTBEAT), payload, qos=1))
    for n in range(oversized):
        topic = telemetry_topic(devices[n % len(devices)], TopicKind.HEARTBEAT)
        infos.append(client.publish(topic, b"[" + b" " * (MAX_MESSAGE_BYTES + 32 * 1024) + b"]", qos=1))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--oversized", type=int, default=40)
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        publish(args.publish, args.messages, args.oversized)
        return
    me = psutil.Process()
    with tempfile.TemporaryDirectory() as work:
        broker = start_broker(Path(work) / "mosquitto")
        engine = make_engine(f"sqlite:///{Path(work) / 'cp.sqlite3'}")
        try:
            # Make the session (subscriptions) first, then leave: the flood waits in the broker.
            first = TelemetryIngestor(engine=engine, broker_url=broker.url, client_id=CLIENT_ID)
            first.start()
            assert first.wait_subscribed(30)
            first.stop()
            print(
                f"publishing {args.messages} max-size and {args.oversized} oversized messages",
                file=sys.stderr,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.ingest_flood",
                    "--publish",
                    broker.url,
                    "--messages",
                    str(args.messages),
                    "--oversized",
                    str(args.oversized),
                ],
                check=True,
            )
            before = me.memory_info().rss
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.02):
                    peak[0] = max(peak[0], me.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            ingestor = TelemetryIngestor(engine=engine, broker_url=broker.url, client_id=CLIENT_ID)
            ingestor.start()
            total = args.messages + args.oversized
            while ingestor.stats().stored + ingestor.stats().rejected < total:
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            ingestor.stop()
            done.set()
            sampler.join()
            stats = ingestor.stats()
        finally:
            engine.dispose()
            broker.stop()
    mib = 1024 * 1024
    print(
        json.dumps(
            {
                "benchmark": "ingest_flood",
                "messages": args.messages,
                "message_bytes": len(max_size_message("flood-00", 1)),
                "oversized": args.oversized,
                "stored_messages": stats.stored,
                "stored_rows": stats.rows,
                "dead_lettered": dict(stats.dead_lettered_by_reason),
                "rss_before_mib": round(before / mib, 1),
                "rss_peak_mib": round(peak[0] / mib, 1),
                "seconds": round(elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
