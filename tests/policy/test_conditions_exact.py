"""The parsers inside match conditions at their bounds: regex length, hour windows (spaces,
minutes, 24:00, past midnight), day ranges across Sunday, real dates, bracketed addresses,
split ranges and their two-decimal rule, and the split bucket itself (pinned: a changed hash
would move every running A/B split's calls to the other branch on upgrade)."""
from __future__ import annotations

import ipaddress

import pytest

from controller.policy import conditions as cond


def test_a_regex_of_512_characters_is_accepted_one_more_is_refused():
    assert cond.compile_regex("a" * 512).search("a" * 512)
    with pytest.raises(ValueError, match="regex is longer than 512 characters"):
        cond.compile_regex("a" * 513)


def test_a_regex_with_repeats_compiles_with_the_default_flags():
    assert cond.compile_regex(r"^\+44[0-9]+$").search("+442079460000")
    assert not cond.compile_regex("abc").search("ABC")  # case-sensitive unless asked


def test_hour_windows_spaces_minutes_and_the_end_of_the_day():
    assert cond.parse_hours(" 09:30 - 17:45 ") == ((570, 1065),)
    assert cond.parse_hours(["23:00-24:00", "00:15-01:00"]) == ((1380, 1440), (15, 60))
    with pytest.raises(ValueError, match="the end of the day is 24:00"):
        cond.parse_hours("23:00-24:01")


def test_a_window_past_midnight_holds_from_its_start_and_up_to_its_end():
    night = cond.parse_hours("22:00-06:00")
    assert [cond.minute_in_windows(m, night) for m in (1319, 1320, 1439, 0, 359, 360)] == [
        False, True, True, True, True, False]
    day = cond.parse_hours("09:00-17:00")
    assert [cond.minute_in_windows(m, day) for m in (539, 540, 1019, 1020)] == [False, True, True, False]


def test_a_day_range_wraps_over_sunday():
    assert cond.parse_days("sat-mon") == {5, 6, 0}
    assert cond.parse_days("sun-tue") == {6, 0, 1}


def test_a_full_date_must_exist_in_its_own_year_a_yearly_one_in_a_leap_year():
    assert cond.parse_dates(["2028-02-29", "02-29"]) == (frozenset({(2028, 2, 29)}), frozenset({(2, 29)}))
    with pytest.raises(ValueError, match="'2027-02-29' is not a real date"):
        cond.parse_dates("2027-02-29")


def test_number_prefixes_are_written_in_e164():
    with pytest.raises(ValueError, match="^empty prefix$"):
        cond.number_prefix("  ")
    with pytest.raises(ValueError, match=r"^number prefix '44' must be written in E\.164 with a leading '\+' "
                                         r"\(e\.g\. '\+44'\), because calls are compared after normalisation$"):
        cond.number_prefix("44")


def test_a_source_address_may_come_in_brackets_or_with_spaces():
    assert cond.parse_ip("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")
    assert cond.parse_ip(" 192.0.2.1 ") == ipaddress.ip_address("192.0.2.1")
    assert cond.parse_ip("not-an-address") is None


def test_split_ranges_out_of_10000_buckets():
    assert cond.split_bounds(50) == (0, 5000)
    assert cond.split_bounds(25, 50) == (5000, 7500)
    assert cond.split_bounds(0.01, 99.99) == (9999, 10000)
    with pytest.raises(ValueError, match="more than 100"):
        cond.split_bounds(50, 50.01)
    for percent, offset in ((10.001, 0), (10, 0.015)):
        with pytest.raises(ValueError, match="at most two decimals"):
            cond.split_bounds(percent, offset)
    # float error is tolerated up to a millionth of a bucket, that included
    assert cond.split_bounds(1e-8) == (0, 0) and cond.split_bounds(10, 1e-8) == (0, 1000)


def test_the_split_bucket_of_a_call_is_pinned_and_takes_any_call_id():
    assert [cond.split_bucket("exp1", "call-1"), cond.split_bucket("", "call-1")] == [5965, 5561]
    # a Call-ID arrives as JSON text, which can hold a lone surrogate: it buckets as '?' does
    assert cond.split_bucket("s", "a\ud800") == cond.split_bucket("s", "a?") == 8205


def test_numbers_and_risk_prefixes_refused_with_what_they_are():
    with pytest.raises(ValueError, match="^True is not a number or SIP user$"):
        cond.number_pattern(True, None)
    with pytest.raises(ValueError, match="^'a b' is neither a phone number nor a SIP user$"):
        cond.number_pattern("a b", _numbering())
    assert cond.risk_prefix(" +1 ") == "+1"  # one digit is a prefix (a whole country code)
    for bad in ("+", "+x1", "1900", "+19 00"):
        with pytest.raises(ValueError, match="must be an E.164 prefix"):
            cond.risk_prefix(bad)


def test_a_network_may_be_written_with_host_bits_set():
    assert cond.parse_network(" 192.0.2.10/24 ") == ipaddress.ip_network("192.0.2.0/24")
    assert cond.parse_network("2001:db8::1/32") == ipaddress.ip_network("2001:db8::/32")


def _numbering():
    from tests.policy.helpers import policy_with
    return policy_with("rules: []\n").source.settings.numbering
