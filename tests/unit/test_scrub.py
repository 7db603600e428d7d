"""The scrubber alone: every run of eight or more of the key's characters, in any case, goes;
shorter runs and other text stay."""

from __future__ import annotations

import traceback

import pytest

from batchroute.errors import InternalDispatchError
from batchroute.scrub import MASK, Scrubber
from tests.helpers import key_echoes, key_fragments

KEY = "sk-proj-Ab3dEf6hIj9kLm2nOp5q"


@pytest.mark.parametrize("form", ["verbatim", "upper", "middle", "json"])
def test_every_echoed_form_of_the_key_is_masked(form: str) -> None:
    text = key_echoes(KEY)[form]
    assert key_fragments(text, KEY)  # the stub echo does hold the key
    clean = Scrubber(KEY).scrub(text)
    assert key_fragments(clean, KEY) == [] and MASK in clean


def test_a_run_becomes_one_mask_and_the_text_around_it_stays() -> None:
    scrub = Scrubber(KEY).scrub
    assert scrub(f"a {KEY} b") == f"a {MASK} b"
    assert scrub(f"a {KEY.swapcase()}{KEY} b") == f"a {MASK} b"  # key twice, touching
    assert scrub(f"{KEY[:8]} and {KEY[-8:]}") == f"{MASK} and {MASK}"  # exactly eight each
    assert scrub(f"x{KEY[3:10]}y") == f"x{KEY[3:10]}y"  # seven characters: prose
    assert scrub("no key here") == "no key here"


def test_keys_too_short_to_tell_from_prose_scrub_nothing() -> None:
    assert Scrubber("k3y").scrub("bad k3y") == "bad k3y"
    assert Scrubber(None).scrub("anything") == "anything"
    assert Scrubber("").scrub("anything") == "anything"


def test_an_exception_holding_the_key_leaves_scrubbed_and_without_its_original() -> None:
    with pytest.raises(InternalDispatchError) as caught, Scrubber(KEY).exceptions():
        raise ValueError(f"provider said {KEY.upper()[2:14]}")
    assert str(caught.value) == f"ValueError: provider said {MASK}"
    printed = "".join(traceback.format_exception(caught.value))
    assert key_fragments(printed, KEY) == []


def test_other_exceptions_pass_through_unchanged() -> None:
    with pytest.raises(KeyError, match="messages"), Scrubber(KEY).exceptions():
        raise KeyError("messages")
