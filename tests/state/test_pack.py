"""RESP packing of every command on the decision path: hiredis's packer, with the slow path for
what it refuses, byte for byte the same, and a clear error for what Redis cannot take."""
import pytest

from controller.state.batch import _pack, pack


@pytest.mark.parametrize("args", [
    ("SET", "k", "v"), ("INCRBY", "k", -3), ("SET", "k", 1.5), ("SET", "k", 10 ** 20), ("SET", "é", b"\x00\xff"),
    ("HSET", "{call:a}", "from", "sip:\ud800@x"),  # a lone surrogate (JSON "\\ud800" from SIP-derived text)
])
def test_commands_pack_the_same_either_way(args):
    assert pack(args) == _pack(args)
    assert pack(args).startswith(b"*%d\r\n" % len(args))


@pytest.mark.parametrize("value", [None, True, {"a": 1}])
def test_what_redis_cannot_take_is_refused_by_type(value):
    with pytest.raises(TypeError, match="cannot send"):
        pack(("SET", "k", value))
