"""OperatorService's fleet RPCs: the device listing, deploying and undeploying, variant pins,
device labels and revoking a device. Each authenticates, checks the request's shape, runs one
fleet command (``edgefleet.controlplane.fleet``) and wakes the devices it changed."""

from __future__ import annotations

from sqlmodel import Session

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, authorize
from edgefleet.controlplane.api.device_summary import device_summary
from edgefleet.controlplane.api.limits import MAX_NAME_CHARS
from edgefleet.controlplane.api.operator_parts import OperatorParts
from edgefleet.controlplane.api.refusals import InvalidRequest
from edgefleet.controlplane.fleet import deployments, devices, pins
from edgefleet.controlplane.fleet.director import pin_message
from edgefleet.controlplane.fleet.rbac import Role
from edgefleet.controlplane.store import deployments as assigned
from edgefleet.controlplane.store import devices as fleet_rows
from edgefleet.controlplane.store.labels import LabelChange
from edgefleet.controlplane.store.models import Bundle, Device
from edgefleet.controlplane.store.pins import PinChange, effective_pin, list_pins
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2

DEVICES = pages.PageSpec("ListDevices", default_size=500, max_size=1000)
ONE_TARGET = "give either all_devices or device_ids"


class FleetRpcs(OperatorParts):
    async def Deploy(
        self, request: operator_pb2.DeployRequest, context: Context
    ) -> operator_pb2.DeployResponse:
        """Adds a release to devices' models (replacing the release of the same name); each
        device's director targets are re-signed listing every model it now holds."""
        who = await authorize(self.db, context, Role.OPERATOR)
        if request.all_devices == bool(request.device_ids):
            raise InvalidRequest(ONE_TARGET)
        ids = None if request.all_devices else list(request.device_ids)
        name, version = request.bundle.name, request.bundle.version
        deployed = await self.command(
            lambda s: deployments.deploy(
                s, self.repositories, actor=who.actor, name=name, version=version, device_ids=ids
            ),
            action="deploy",
            target=f"{name}@{version}",
        )
        self.notifier.changed([d.device_id for d in deployed])
        return operator_pb2.DeployResponse(
            device_ids=[d.device_id for d in deployed],
            max_generation=max((d.generation for d in deployed), default=0),
        )

    async def Undeploy(
        self, request: operator_pb2.UndeployRequest, context: Context
    ) -> operator_pb2.UndeployResponse:
        """Removes a model from devices: each device that held it gets director targets listing
        its remaining models (none at all is a valid assignment) and a nudge to apply them."""
        who = await authorize(self.db, context, Role.OPERATOR)
        if not request.name or len(request.name) > MAX_NAME_CHARS:
            raise InvalidRequest(f"name is required, at most {MAX_NAME_CHARS} characters")
        if request.all_devices == bool(request.device_ids):
            raise InvalidRequest(ONE_TARGET)
        ids = None if request.all_devices else list(request.device_ids)
        changed = await self.command(
            lambda s: deployments.undeploy(
                s, self.repositories, actor=who.actor, name=request.name, device_ids=ids
            ),
            action="undeploy",
            target=request.name,
        )
        self.notifier.changed([d.device_id for d in changed])
        return operator_pb2.UndeployResponse(
            device_ids=[d.device_id for d in changed],
            max_generation=max((d.generation for d in changed), default=0),
        )

    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: Context
    ) -> operator_pb2.ListDevicesResponse:
        """A page of devices in enrollment order (``pages``)."""
        await authorize(self.db, context, Role.VIEWER)
        size = DEVICES.size(request.page_size)
        after = pages.str_key(pages.decode_token(DEVICES, request.page_token, {}))

        def summaries(session: Session) -> pages.Page[common_pb2.DeviceSummary]:
            rows = fleet_rows.list_devices(session, after=after, limit=size + 1)
            in_force = list_pins(session)
            models = assigned.assigned_models(session, device_ids=[d.id for d in rows])

            def summary(d: Device) -> common_pb2.DeviceSummary:
                desired = session.get(Bundle, d.desired_bundle_id) if d.desired_bundle_id else None
                return device_summary(
                    d, desired, pin_message(effective_pin(in_force, d)), models.get(d.id, ())
                )

            return pages.cut(DEVICES, rows, size=size, encode=summary, key=lambda d: d.id, filters={})

        page = await self.db.run(summaries)
        return operator_pb2.ListDevicesResponse(devices=page.items, next_page_token=page.next_page_token)

    async def RevokeDevice(
        self, request: operator_pb2.RevokeDeviceRequest, context: Context
    ) -> operator_pb2.RevokeDeviceResponse:
        who = await authorize(self.db, context, Role.OPERATOR)
        revoked = await self.command(
            lambda s: devices.revoke_device(s, actor=who.actor, device_id=request.device_id),
            action="device.revoke",
            target=request.device_id,
        )
        self.notifier.changed([request.device_id])  # its open stream re-checks and ends
        if revoked and self.on_device_revoked is not None:
            await self.on_device_revoked(request.device_id)
        return operator_pb2.RevokeDeviceResponse(revoked=revoked)

    async def SetVariantPin(
        self, request: operator_pb2.SetVariantPinRequest, context: Context
    ) -> operator_pb2.SetVariantPinResponse:
        """Pins travel in signed director targets: every device whose pin in force changed is
        re-assigned its release at a new generation, and so chooses its variant again."""
        who = await authorize(self.db, context, Role.OPERATOR)
        selector = dict(request.selector)

        def pin(session: Session) -> PinChange:
            return pins.set_pin(
                session,
                self.repositories,
                actor=who.actor,
                device_id=request.device_id,
                selector=selector,
                variant_id=request.variant_id,
                fmt=request.format,
                clear=request.clear,
            )

        change = await self.command(
            pin,
            action=pins.pin_action(clear=request.clear),
            target=pins.pin_target(device_id=request.device_id, selector=selector),
        )
        ids = [m.device_id for m in change.repinned]
        self.notifier.changed(ids)
        return operator_pb2.SetVariantPinResponse(
            device_ids=ids,
            max_generation=max((m.generation for m in change.repinned), default=0),
            changed=change.changed,
        )

    async def SetDeviceLabels(
        self, request: operator_pb2.SetDeviceLabelsRequest, context: Context
    ) -> operator_pb2.SetDeviceLabelsResponse:
        """Labels select devices for rollouts and group pins; a change that moves the device into
        or out of a group pin re-signs its director targets with the pin now in force."""
        who = await authorize(self.db, context, Role.OPERATOR)
        if not request.device_id:
            raise InvalidRequest("device_id is required")

        def label(session: Session) -> LabelChange:
            return pins.set_labels(
                session,
                self.repositories,
                actor=who.actor,
                device_id=request.device_id,
                set_=dict(request.set),
                remove=list(request.remove),
            )

        change = await self.command(label, action="device.labels", target=request.device_id)
        if change.repinned is not None:
            self.notifier.changed([request.device_id])
        return operator_pb2.SetDeviceLabelsResponse(labels=change.labels)
