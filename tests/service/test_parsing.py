"""The strict integer parser: ASCII digits of bounded length, everything else a 400."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import InvalidRequest
from service.parsing import MAX_DIGITS, parse_uint


@given(st.integers(min_value=0, max_value=10**MAX_DIGITS - 1))
def test_every_number_in_range_round_trips(value):
    assert parse_uint(str(value), name="n") == value


@given(st.text(max_size=40))
def test_any_text_is_a_number_or_a_400(text):
    try:
        value = parse_uint(text, name="header X")
    except InvalidRequest as err:
        assert err.status == 400 and "header X" in err.message and "ASCII digits" in err.message
        assert not (text and len(text) <= MAX_DIGITS and text.isascii() and text.isdecimal())
    else:
        assert str(value).zfill(len(text)) == text  # leading zeros are the only freedom
        assert text.isascii() and text.isdecimal() and 1 <= len(text) <= MAX_DIGITS


@given(st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=5))
def test_unicode_digits_are_refused(text):
    if text.isascii():
        return
    with pytest.raises(InvalidRequest):
        parse_uint(text, name="version")


@pytest.mark.parametrize(
    "text", ["²", "1²", "", " 1", "1 ", "+1", "-1", "1_000", "0x10", "1.0", "١", "9" * 5000]
)
def test_the_inputs_that_gave_500s_give_400s(text):
    with pytest.raises(InvalidRequest) as info:
        parse_uint(text, name="Last-Event-ID")
    assert info.value.param == "Last-Event-ID"
    assert len(info.value.message) < 300  # a 5000-digit input is not echoed back


def test_max_digits_bounds_the_length():
    assert parse_uint("12345", name="v", max_digits=5) == 12345
    with pytest.raises(InvalidRequest, match="1 to 5 ASCII digits"):
        parse_uint("123456", name="v", max_digits=5)
    with pytest.raises(ValueError):
        parse_uint("1", name="v", max_digits=0)
