"""mask.v1 encoder/decoder: round trips, schema validation, hostile-payload limits."""
from __future__ import annotations

import time
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest

from sinks import wire
from sinks.wire import MaskMessage, WireError, decode, encode
from stream.events import Instance, MaskResult, SensorSize, Step, make_events


def _result(index: int = 3, w: int = 346, h: int = 260, source: str = "synthetic:test") -> MaskResult:
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 30:50] = 1
    mask[h - 5 :, w - 7 :] = 3
    ev = make_events([1000 * index + 1, 1000 * index + 2], [1, 2], [3, 4], [1, 0])
    step = Step(index, 1000 * index, 1000 * (index + 1), None, ev, SensorSize(w, h), time.perf_counter_ns(), source=source)
    inst = [Instance(7, 1, (30, 10, 49, 19), 200), Instance(8, 3, (w - 7, h - 5, w - 1, h - 1), 35)]
    return MaskResult(step, mask, inst)


def _raw(**over: object) -> dict:
    """A valid payload as a dict, with overrides (None deletes the key)."""
    obj = msgpack.unpackb(encode(_result(), 5, compress=False, latency_us=42), raw=False)
    for k, v in over.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(compress: bool) -> None:
    r = _result()
    msg = decode(encode(r, 5, compress=compress, latency_us=1234))
    assert isinstance(msg, MaskMessage)
    assert (msg.seq, msg.step, msg.t0_us, msg.t1_us) == (5, 3, 3000, 4000)
    assert (msg.width, msg.height, msg.n_events, msg.latency_us) == (346, 260, 2, 1234)
    assert msg.encoding == ("zlib-u8" if compress else "u8")
    assert msg.source == "synthetic:test"
    assert msg.mask.shape == (260, 346) and msg.mask.dtype == np.uint8
    np.testing.assert_array_equal(msg.mask, r.mask)
    assert msg.instances == tuple(r.instances)
    assert msg.mask_pixels == 200 + 35


def test_compression_shrinks_masks() -> None:
    r = _result()
    assert len(encode(r, 0, compress=True)) < len(encode(r, 0, compress=False)) / 20


def test_latency_defaults_to_time_since_bin_close() -> None:
    r = _result()
    r.step.closed_ns = time.perf_counter_ns() - 5_000_000  # closed 5 ms ago
    msg = decode(encode(r, 0))
    assert 5_000 <= msg.latency_us < 5_000_000


def test_unknown_keys_are_ignored() -> None:
    obj = _raw(future_key=[1, 2, 3])
    obj["instances"][0]["score"] = 0.5
    msg = decode(msgpack.packb(obj, use_bin_type=True))
    assert msg.seq == 5 and msg.instances[0].id == 7


def test_encode_rejects_non_uint8_masks() -> None:
    r = _result()
    r.mask = r.mask.astype(np.int32)
    with pytest.raises(ValueError, match="uint8"):
        encode(r, 0)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"schema": "mask.v2"}, "unsupported schema 'mask.v2'"),
        ({"schema": None}, "unsupported schema None"),
        ({"latency_us": None}, "lacks key"),
        ({"width": "346"}, "'width' must be an integer"),
        ({"seq": True}, "'seq' must be an integer"),
        ({"width": 345}, "expected width\\*height"),
        ({"encoding": "png"}, "encoding 'png' is unknown"),
        ({"mask": "text"}, "must be binary"),
        ({"instances": {"id": 1}}, "must be a list"),
        ({"instances": [{"id": 1, "class": 1, "area": 3}]}, "lacks key 'bbox'"),
        ({"instances": [{"id": 1, "class": 1, "bbox": [0, 0, 400, 2], "area": 3}]}, "outside"),
        ({"t1_us": 0}, "before t0_us"),
        ({"width": 0}, "out of range"),
    ],
)
def test_schema_validation_errors(over: dict, match: str) -> None:
    with pytest.raises(WireError, match=match) as ei:
        decode(msgpack.packb(_raw(**over), use_bin_type=True))
    assert "\n" not in str(ei.value)


def test_not_a_map_or_not_msgpack() -> None:
    with pytest.raises(WireError, match="must be a msgpack map"):
        decode(msgpack.packb([1, 2]))
    with pytest.raises(WireError, match="not a valid msgpack"):
        decode(b"\xc1garbage")
    with pytest.raises(WireError, match="not a valid msgpack"):
        decode(msgpack.packb(_raw()) + b"\x00")  # trailing data


def test_bad_zlib_is_rejected() -> None:
    raw = _raw()
    good = zlib.compress(raw["mask"], 1)
    for data, match in [(b"nonsense", "not valid zlib"), (good[:-6], "truncated"), (good + b"xx", "trailing")]:
        obj = dict(raw, encoding="zlib-u8", mask=data)
        with pytest.raises(WireError, match=match):
            decode(msgpack.packb(obj, use_bin_type=True))


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except WireError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_zlib_bomb_is_rejected_without_inflating() -> None:
    bomb = zlib.compress(bytes(64 * 1024 * 1024), 9)  # 64 MiB of zeros in ~64 KiB
    obj = dict(_raw(), width=100, height=100, encoding="zlib-u8", mask=bomb, instances=[])
    payload = msgpack.packb(obj, use_bin_type=True)
    assert len(payload) < 200_000
    with pytest.raises(WireError, match="inflates to more than"):
        decode(payload)
    assert _peak_bytes(lambda: decode(payload)) < 4 * 1024 * 1024


def test_huge_length_headers_are_rejected_before_allocation() -> None:
    # A map whose 'instances' claims 2**32-1 elements, and a bin claiming 4 GiB, with no data behind.
    huge_array = b"\x81" + msgpack.packb("instances") + b"\xdd\xff\xff\xff\xff"
    huge_bin = b"\x81" + msgpack.packb("mask") + b"\xc6\xff\xff\xff\xff"
    huge_map = b"\xdf\xff\xff\xff\xff"
    for payload in (huge_array, huge_bin, huge_map):
        with pytest.raises(WireError):
            decode(payload)
        assert _peak_bytes(lambda p=payload: decode(p)) < 1024 * 1024


def test_side_cap() -> None:
    obj = dict(_raw(), width=wire.MAX_SIDE + 1, height=1, mask=b"")
    with pytest.raises(WireError, match="out of range"):
        decode(msgpack.packb(obj, use_bin_type=True))
    # a reader may choose a smaller cap
    with pytest.raises(WireError, match="out of range"):
        decode(encode(_result(), 0), max_side=100)
