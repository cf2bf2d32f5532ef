"""What a generation will do, decided before anything changes: the signed pin and device config
it carries, and for each assigned release whether it keeps serving, loads again with new load
settings, installs, or is refused.

Kept apart from the steps that act on the plan so that everything able to refuse a whole
generation (an unusable config, a pin no release has, a context length no serving variant
fits) is found while every model still serves as it did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from edgefleet.agent.config import EffectiveSettings, LoadSettings
from edgefleet.agent.device.hardware import HardwareProfile
from edgefleet.agent.runtimes.memory_budget import ModelMemoryExhausted
from edgefleet.agent.update.errors import AgentError, Refusal
from edgefleet.agent.update.selection import Pin, PinNotHonoured, Selection, memory_needed, select_variant
from edgefleet.agent.update.state import AgentState, InstallRecord
from edgefleet.agent.update.uptane_client import Assignment
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.device_config import InvalidConfig, is_empty, validate_config
from edgefleet.protos.fleet.v1 import common_pb2

log = logging.getLogger(__name__)

REFUSALS = (Refusal, ModelMemoryExhausted)
"""What refuses one model's release (reported; its current release keeps serving): the refusal
family, and ModelMemoryExhausted (defined with the memory budget, in no family: the models in
use hold the memory a load needs; the update reports it rather than wait for them)."""


class UnusableConfig(AgentError, Refusal):
    """The signed device config breaks a rule, or a model cannot run with it; nothing changed."""


@dataclass
class Plan:
    """What a generation does to each assigned release, decided before anything changes."""

    keep: list[InstallRecord] = field(default_factory=list)  # serving as it should
    reload: list[InstallRecord] = field(default_factory=list)  # same artifact, new load settings
    install: list[tuple[rel.VerifiedRelease, Selection]] = field(default_factory=list)
    refused: list[tuple[str, BaseException]] = field(default_factory=list)  # (bundle name, why)


@dataclass(frozen=True, slots=True)
class Serving:
    """What the device serves while it plans: the state, the settings in force, per model the
    settings its runtime was loaded with, and whether a runtime is loaded for a name."""

    state: AgentState
    settings: EffectiveSettings
    loaded_with: Mapping[str, LoadSettings]
    is_loaded: Callable[[str], bool]


def plan(
    assignment: Assignment,
    pins: dict[str, Pin | None],
    settings: EffectiveSettings,
    *,
    profile: HardwareProfile,
    formats: frozenset[int],
    serving: Serving,
    on_selection: Callable[[Selection], None],
) -> Plan:
    """Chooses each release's variant under the new settings (``n_ctx`` counts toward what
    fits), and sorts the releases: serving as chosen, to reload, to install, refused.
    UnusableConfig when the new settings are what keeps a serving release from running.
    ``on_selection`` hears each variant chosen (the status reports name the latest)."""
    result = Plan()
    for release in assignment.releases:
        pin = pins.get(release.name)
        try:
            selection = select_variant(
                release, hardware=profile, supported_formats=formats, n_ctx=settings.n_ctx, pin=pin
            )
        except REFUSALS as exc:
            _blame_config(release, pin, profile, formats, settings, serving, exc)
            log.error("refused %s@%d: %s: %s", release.name, release.version, type(exc).__name__, exc)
            result.refused.append((release.name, exc))
            continue
        on_selection(selection)
        current = _serving_record(release, selection, serving)
        if current is None:
            result.install.append((release, selection))
            continue
        updated = replace(
            current,
            generation=assignment.generation,
            memory_bytes=memory_needed(selection.variant, settings.n_ctx),
        )
        if serving.loaded_with.get(release.name) == settings.load:
            log.info("%s: %s; already serving it", release.name, selection.reason)
            result.keep.append(updated)
        else:
            result.reload.append(updated)
    return result


def _blame_config(
    release: rel.VerifiedRelease,
    pin: Pin | None,
    profile: HardwareProfile,
    formats: frozenset[int],
    settings: EffectiveSettings,
    serving: Serving,
    exc: BaseException,
) -> None:
    """No variant of a release this device serves fits the new context length, though one
    fits the current one: the config is what the device cannot use, so the whole generation
    is refused (UnusableConfig) before anything changes, as when a reload fails."""
    current = serving.state.model(release.name)
    n_ctx = serving.settings.n_ctx
    if current is None or current.version != release.version or settings.n_ctx == n_ctx:
        return
    try:
        select_variant(release, hardware=profile, supported_formats=formats, n_ctx=n_ctx, pin=pin)
    except REFUSALS:
        return  # refused under the current settings too: not the config's doing
    raise UnusableConfig(
        f"{release.name}@{release.version} cannot run with n_ctx={settings.n_ctx}: {exc}"
    ) from exc


def _serving_record(
    verified: rel.VerifiedRelease, selection: Selection, serving: Serving
) -> InstallRecord | None:
    """The install record of ``verified`` when the variant chosen is what serves it now
    (unchanged, or a re-selection chose it again): nothing to fetch."""
    info = verified.artifacts[selection.variant.artifact]
    current = serving.state.model(verified.name)
    if (
        current is not None
        and (current.version, current.artifact_sha256) == (verified.version, info.sha256)
        and serving.is_loaded(verified.name)
    ):
        return current
    return None


# -- what the director signed besides the releases ---------------------------------------------------


def release_pins(assignment: Assignment) -> dict[str, Pin | None]:
    """Which release the signed pin applies to: a runtime pin to every release, a variant pin
    to the releases that have that variant; a variant pin no release has is a refusal."""
    pin = signed_pin(assignment)
    if pin is None:
        return {}
    if pin.format:
        return {release.name: pin for release in assignment.releases}
    pins: dict[str, Pin | None] = {
        release.name: pin
        for release in assignment.releases
        if any(pin.admits(v) for v in release.manifest.variants)
    }
    if assignment.releases and not pins:
        listed = ", ".join(f"{r.name}@{r.version}" for r in assignment.releases)
        raise PinNotHonoured(f"{pin.describe()}, but no assigned release has that variant ({listed})")
    return pins


def signed_pin(assignment: Assignment) -> Pin | None:
    """The operator's pin, as signed into this device's director targets (never the unsigned
    nudge): the director's own pin, else the pin of the signed device config. When both are set
    the director's wins (it is the newer, more specific word: ``fleetctl devices pin``), and the
    overridden config pin is logged. A malformed pin is a refusal, not a silent "no pin"."""
    director = _usable_pin(assignment.pin, "director targets carry")
    config = assignment.config
    from_config = (
        _usable_pin(config.pin, "device config carries") if config and config.HasField("pin") else None
    )
    if director is not None and from_config is not None and director != from_config:
        log.warning(
            "the director's pin (%s) wins over the device config's (%s)",
            director.describe(),
            from_config.describe(),
        )
    return director if director is not None else from_config


def pin_overridden(assignment: Assignment) -> bool:
    """Both the director and the config signed a pin: the director's applies (``signed_pin``)."""
    config = assignment.config
    director = assignment.pin
    return (
        director is not None
        and bool(director.variant_id or director.format)
        and config is not None
        and config.HasField("pin")
    )


def _usable_pin(message: common_pb2.VariantPin | None, where: str) -> Pin | None:
    if message is None:
        return None
    try:
        return Pin.from_message(message)
    except ValueError as exc:
        raise rel.MalformedMetadata(f"{where} an unusable pin: {exc}") from exc


def signed_config(assignment: Assignment) -> common_pb2.DeviceConfig | None:
    """The device config the director signed, checked against the same rules the control plane
    applies (edgefleet.protos.fleet.device_config): the control plane refuses an invalid config,
    so one arriving here means a compromised director or a stricter agent. None: no config, the
    command line's settings."""
    config = assignment.config
    if config is None or is_empty(config):
        return None
    try:
        validate_config(config)
    except InvalidConfig as exc:
        raise UnusableConfig(f"device config refused: {exc}") from exc
    return config
