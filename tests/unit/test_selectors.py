"""The one KEY=VALUE selector parser and matcher (edgefleet.protos.fleet.selectors)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.protos.fleet import selectors

keys = st.from_regex(selectors.LABEL_KEY, fullmatch=True)
values = st.from_regex(selectors.LABEL_VALUE, fullmatch=True)
label_sets = st.dictionaries(keys, values, max_size=selectors.MAX_LABELS)
text = st.text(max_size=80)


@given(st.dictionaries(keys, values, min_size=1, max_size=selectors.MAX_LABELS))
def test_the_canonical_text_parses_back_to_the_same_selector(selector: dict[str, str]) -> None:
    selectors.check_selector(selector)
    assert selectors.parse([selectors.to_text(selector)]) == selector


@given(st.lists(st.dictionaries(keys, values, min_size=1, max_size=4), max_size=5))
def test_repeated_items_read_as_their_comma_separated_form(groups: list[dict[str, str]]) -> None:
    items = [selectors.to_text(g) for g in groups]
    assert selectors.parse(items) == selectors.parse([",".join(items)] if items else None)


@given(label_sets, label_sets)
def test_a_device_matches_when_it_has_every_label_of_the_selector(
    labels: dict[str, str], selector: dict[str, str]
) -> None:
    assert selectors.matches(labels, selector) == (selector.items() <= labels.items())
    assert selectors.matches({**labels, **selector}, selector)
    assert selectors.matches(labels, {})


@given(text)
def test_an_item_without_a_key_before_an_equals_sign_is_refused_by_type(item: str) -> None:
    first = item.split(",")[0]
    key, sep, _ = first.partition("=")
    if sep and key:
        return  # a well-formed first item; the syntax has nothing to refuse there
    with pytest.raises(selectors.NotKeyValue) as refused:
        selectors.parse([item])
    assert refused.value.item == first
    assert isinstance(refused.value, selectors.SelectorError)


def test_nothing_given_is_the_empty_selector_and_an_empty_item_is_refused() -> None:
    assert selectors.parse(None) == selectors.parse([]) == {}
    for items in ([""], ["hw=jetson,"], ["=x"], ["hw=jetson,site"]):
        with pytest.raises(selectors.NotKeyValue):
            selectors.parse(items)
    assert selectors.parse(["hw=a=b"]) == {"hw": "a=b"}  # the first '=' splits; check_selector refuses it
    with pytest.raises(selectors.InvalidLabels):
        selectors.check_selector(selectors.parse(["hw=a=b"]))


@given(label_sets)
def test_labels_of_the_form_pass_and_one_more_than_allowed_is_refused(labels: dict[str, str]) -> None:
    selectors.check_labels(labels)
    too_many = {f"k{i}": "" for i in range(selectors.MAX_LABELS + 1)}
    with pytest.raises(selectors.InvalidLabels):
        selectors.check_labels(too_many)


@given(st.text(min_size=1, max_size=300).filter(lambda k: not selectors.LABEL_KEY.fullmatch(k)))
def test_a_key_outside_the_form_is_refused_with_a_bounded_message(key: str) -> None:
    with pytest.raises(selectors.InvalidLabels) as refused:
        selectors.check_labels({key: "v"}, what="selector")
    assert len(str(refused.value)) < 300
    assert str(refused.value).startswith("selector ")
