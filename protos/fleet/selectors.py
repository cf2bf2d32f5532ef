"""Labels and label selectors: their one written form, parsing it, and matching devices by it.

A device carries labels (``hw=jetson``); a selector (``hw=jetson,site=a``) picks every device
that has all of its labels with the same values. Group pins, rollouts, ``fleetctl undeploy
--selector`` and enrollment tokens all use this one form, so it lives here, with no dependency
on either side: the control plane checks and matches labels with it, the command line parses
what an operator typed with it. Pure functions; every refusal is a ``SelectorError`` subclass.

Why the form is so narrow: labels are listed with every device and compared by every selector,
and a selector is written on a command line and stored as a scope key ("labels:hw=jetson"), so
a label must read back unchanged as a KEY=VALUE shell word and stay small by construction.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable, Mapping

MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 128
LABEL_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._/-]{{0,{MAX_LABEL_KEY - 1}}}")
LABEL_VALUE = re.compile(rf"[A-Za-z0-9._:/@+-]{{0,{MAX_LABEL_VALUE}}}")

SHOWN_CHARS = 40  # of an offending key or value, as an error names it


class SelectorError(ValueError):
    """Labels or a selector that cannot be used; the message says why."""


class InvalidLabels(SelectorError):
    """Labels or a selector that are not KEY=VALUE as selectors write them, or too many."""


class NotKeyValue(SelectorError):
    """A written selector item that is not KEY=VALUE (no '=', or nothing before it)."""

    def __init__(self, item: str, *, what: str) -> None:
        super().__init__(f"{what} {item!r} is not KEY=VALUE")
        self.item = item


def _shown(text: str) -> str:
    """``text`` quoted as an error shows it, cut to about SHOWN_CHARS ('abc...xyz')."""
    shown = reprlib.Repr()
    shown.maxstring = SHOWN_CHARS
    return shown.repr(text)


def check_labels(labels: Mapping[str, str], *, what: str = "label") -> None:
    """Raises InvalidLabels unless there are at most MAX_LABELS items and each can be written
    as KEY=VALUE in a selector ("hw=jetson,site=a") and a shell word: a key of 1-63 letters,
    digits, '.', '_', '/' or '-' starting with a letter or digit; a value of at most 128 of
    those or ':', '@', '+'."""
    if len(labels) > MAX_LABELS:
        raise InvalidLabels(f"at most {MAX_LABELS} {what}s, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidLabels(
                f"{what} {_shown(key)} is not KEY=VALUE as selectors write it: a key is "
                f"1-{MAX_LABEL_KEY} letters, digits, '.', '_', '/' or '-' starting with a letter or digit"
            )
        if not LABEL_VALUE.fullmatch(value):
            raise InvalidLabels(
                f"{what} {key}={_shown(value)} is not KEY=VALUE as selectors write it: a value is "
                f"at most {MAX_LABEL_VALUE} letters, digits, '.', '_', '/', '-', ':', '@' or '+'"
            )


def check_selector(selector: Mapping[str, str], *, what: str = "selector") -> None:
    """A selector has the form and bounds of labels (``check_labels``)."""
    check_labels(selector, what=what)


def parse(items: Iterable[str] | None, *, what: str = "selector") -> dict[str, str]:
    """Repeated or comma-separated KEY=VALUE items ("hw=jetson,site=a") as one selector; None
    or no items: the empty selector (every device). Raises NotKeyValue for the first item that
    has no '=' or nothing before it (an empty item included). Only the syntax is checked
    here; ``check_selector`` checks the form each key and value must have."""
    selector: dict[str, str] = {}
    for item in (part for group in items or () for part in group.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NotKeyValue(item, what=what)
        selector[key] = value
    return selector


def to_text(selector: Mapping[str, str]) -> str:
    """ "hw=jetson,site=a": the canonical, sorted form used as a scope key and shown to people;
    ``parse`` reads it back to the same selector for labels of the checked form."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """A device matches a selector when it has every key with the same value (empty: all)."""
    return all(labels.get(k) == v for k, v in selector.items())
