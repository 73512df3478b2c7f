import pytest

from controller.policy.numbers import Numbering

UK = Numbering(country_code="44", international_prefixes=("00",), national_prefix="0")
NANP = Numbering(country_code="1", international_prefixes=("011",), national_prefix="1")


@pytest.mark.parametrize("numbering, raw, expected", [
    (UK, "+44 20 7946 0000", "+442079460000"),
    (UK, "02079460000", "+442079460000"),
    (UK, "00442079460000", "+442079460000"),
    (UK, "(020) 7946-0000", "+442079460000"),
    (UK, "999", "999"),                    # short code: no country code
    (UK, "alice", "alice"),                # not a number: untouched
    (UK, "anonymous", "anonymous"),
    (UK, "+442079460000;phone-context=x", "+442079460000"),
    (UK, "", ""),
    (NANP, "4155550100", "+14155550100"),
    (NANP, "14155550100", "+14155550100"),
    (NANP, "1-415-555-0100", "+14155550100"),
    (NANP, "01144207946000", "+44207946000"),
    (NANP, "911", "911"),
    (Numbering(), "02079460000", "02079460000"),  # no home country: national numbers stay as dialled
    (Numbering(), "00442079460000", "+442079460000"),
    (UK, "12 34\x00", "12 34\x00"),         # garbage stays as it came
    (UK, "\u0660\u0662\u0660\u0667\u0669\u0664\u0666\u0660\u0660\u0660\u0660", "\u0660\u0662\u0660\u0667\u0669\u0664\u0666\u0660\u0660\u0660\u0660"),  # digits, not ASCII ones
    (UK, "+", "+"),
    (UK, "+\u00b2", "+\u00b2"),
])
def test_normalise(numbering, raw, expected):
    assert numbering.normalise(raw) == expected
