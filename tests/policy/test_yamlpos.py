import pytest

from controller.policy.yamlpos import YamlSyntaxError, load_yaml


def test_positions_of_keys_and_values():
    doc = load_yaml("a:\n  b: [1, 2]\n  c:\n    - x: y\n", "f.yaml")
    assert doc.data == {"a": {"b": [1, 2], "c": [{"x": "y"}]}}
    assert str(doc.position(("a", "b", 1))) == "f.yaml:2:10"
    assert str(doc.position(("a", "c", 0, "x"))) == "f.yaml:4:10"
    assert str(doc.position(("a", "c", 0, "x"), key=True)) == "f.yaml:4:7"
    # unknown deeper paths fall back to the nearest known parent
    assert str(doc.position(("a", "c", 0, "x", "zzz"))) == "f.yaml:4:10"


@pytest.mark.parametrize("text, expected", [
    ("17:00", "17:00"),          # YAML 1.1 would give 1020
    ("no", "no"), ("on", "on"), ("yes", "yes"),  # YAML 1.1 booleans
    ("+14155550100", "+14155550100"),  # stays a string with its '+'
    ("0207", "0207"),            # leading zero: not an octal/int
    ("4155550100", 4155550100),
    ("-3", -3), ("1.5", 1.5), ("true", True), ("False", False), ("~", None), ("null", None),
    ("2026-12-25", "2026-12-25"),  # no timestamp conversion
    ("'17:00'", "17:00"),
])
def test_yaml_12_core_scalars(text, expected):
    assert load_yaml(f"v: {text}\n", "f.yaml").data == {"v": expected}


def test_duplicate_key_is_an_error_with_both_lines():
    with pytest.raises(YamlSyntaxError) as info:
        load_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert str(info.value.position) == "f.yaml:3:1"
    assert "duplicate key 'a' (first defined at line 1)" in str(info.value)


def test_syntax_error_has_a_position():
    with pytest.raises(YamlSyntaxError) as info:
        load_yaml("a: [1, 2\nb: 3\n", "f.yaml")
    assert info.value.position.file == "f.yaml" and info.value.position.line >= 2


@pytest.mark.parametrize("text, message", [
    ("base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys"),
    ("v: !!binary aGVsbG8=\n", "unsupported YAML tag"),
    ("v: !!int 0x1F\n", "not a valid int"),
    ("? [a, b]\n: 1\n", "plain scalars"),
    ("v: \x00\n", "YAML syntax"),
])
def test_unsupported_constructs_are_refused(text, message):
    with pytest.raises(YamlSyntaxError) as info:
        load_yaml(text, "f.yaml")
    assert message in str(info.value)


def test_empty_document_is_none():
    assert load_yaml("# only a comment\n", "f.yaml").data is None
