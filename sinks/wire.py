"""The ``mask.v1`` wire format: one msgpack map per step, encoded and decoded here only.

A message on the ZeroMQ topic is two frames, ``[topic, payload]``; ``payload`` is a
msgpack map (full description and an example reader in ``docs/wire-format.md``)::

    schema      "mask.v1"
    seq         int, message counter from 0 per publisher (a gap means a drop)
    step        int, time-step index since the stream started (keeps counting across resets)
    t0_us/t1_us int, sensor time span [t0, t1) of the step's bin in microseconds
    width/height int, mask size in pixels
    encoding    "u8" (raw) or "zlib-u8" (zlib-compressed raw)
    mask        bin, height*width bytes row-major, 0 = background, k = class k (1-based)
    n_events    int, events in the bin
    instances   list of {id, class, bbox [x0, y0, x1, y1] inclusive, area}
    latency_us  int, bin close -> send on the publisher's clock
    source      str, short description of the input

Readers ignore unknown keys (in the top map and in instance maps); changing the meaning
or type of any key above means a new schema name (``mask.v2``).

Decoding is defensive because the payload comes from the network: every size is
capped *before* memory is allocated (msgpack ``max_*_len``, the mask side length, and
the zlib output via ``decompressobj(...).decompress(data, max_length=w*h)``), and every
failure is a :class:`WireError` with one line saying what was wrong.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from stream.events import Instance, MaskResult

SCHEMA = "mask.v1"
ENCODINGS = ("u8", "zlib-u8")
#: Largest accepted mask side (pixels); 8192 x 8192 = 64 MiB is the biggest mask a reader allocates.
MAX_SIDE = 8192
#: Most instances per message a reader accepts.
MAX_INSTANCES = 65536
#: Longest string (schema, encoding, source) a reader accepts, in bytes.
MAX_STR = 4096
#: ``source`` is cut to this many characters by the writer.
SOURCE_CHARS = 200
#: zlib level: level 1 is within a few % of level 6 in size on masks and ~4x faster.
ZLIB_LEVEL = 1

REQUIRED_KEYS = (
    "schema", "seq", "step", "t0_us", "t1_us", "width", "height",
    "encoding", "mask", "n_events", "instances", "latency_us", "source",
)


class WireError(ValueError):
    """A payload that is not a valid ``mask.v1`` message (one line: what and why)."""


@dataclass(frozen=True, eq=False)
class MaskMessage:
    """One decoded ``mask.v1`` message.

    ``mask`` is a read-only (height, width) uint8 array; ``instances`` are
    :class:`stream.events.Instance` (``cls`` is the wire key ``class``).
    """

    seq: int
    step: int
    t0_us: int
    t1_us: int
    width: int
    height: int
    mask: np.ndarray
    n_events: int
    instances: tuple[Instance, ...]
    latency_us: int
    source: str
    encoding: str
    schema: str = SCHEMA
    nbytes: int = 0  # payload size on the wire

    @property
    def mask_pixels(self) -> int:
        """Number of non-background pixels."""
        return int(np.count_nonzero(self.mask))


# ---------------------------------------------------------------------------------- writing
_EMPTY_ZLIB: dict[tuple[int, int], bytes] = {}


def _zlib_mask(mask: np.ndarray) -> bytes:
    """zlib level 1 of the raw mask bytes.

    zlib costs ~0.4 ms for a 346x260 mask here whatever its content, so the (frequent)
    empty mask is compressed once per shape and reused; ``mask.any()`` costs ~10 us.
    """
    if not mask.any():
        key = mask.shape
        cached = _EMPTY_ZLIB.get(key)
        if cached is None:
            cached = _EMPTY_ZLIB[key] = zlib.compress(bytes(mask.size), ZLIB_LEVEL)
        return cached
    return zlib.compress(np.ascontiguousarray(mask).tobytes(), ZLIB_LEVEL)


def encode(
    result: MaskResult,
    seq: int,
    *,
    compress: bool = True,
    latency_us: int | None = None,
    source: str | None = None,
) -> bytes:
    """Encode one :class:`MaskResult` as a ``mask.v1`` payload.

    ``latency_us`` defaults to ``(perf_counter_ns() - step.closed_ns) / 1000``, i.e. bin
    close -> now; pass it to pin the value (tests).  ``source`` defaults to ``step.source``.
    Raises ValueError when the mask is not a 2-D uint8 array.
    """
    mask = result.mask
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(
            f"mask must be an (H, W) uint8 numpy array, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {getattr(mask, 'shape', '')}"
        )
    h, w = mask.shape
    if compress:
        data, encoding = _zlib_mask(mask), "zlib-u8"
    else:
        data, encoding = np.ascontiguousarray(mask).tobytes(), "u8"
    step = result.step
    if latency_us is None:
        latency_us = max(0, (time.perf_counter_ns() - step.closed_ns) // 1000)
    src = step.source if source is None else source
    payload = {
        "schema": SCHEMA,
        "seq": int(seq),
        "step": int(step.index),
        "t0_us": int(step.t0_us),
        "t1_us": int(step.t1_us),
        "width": int(w),
        "height": int(h),
        "encoding": encoding,
        "mask": data,
        "n_events": int(len(step.events)),
        "instances": [
            {"id": int(i.id), "class": int(i.cls), "bbox": [int(v) for v in i.bbox], "area": int(i.area)}
            for i in result.instances
        ],
        "latency_us": int(latency_us),
        "source": str(src)[:SOURCE_CHARS],
    }
    return msgpack.packb(payload, use_bin_type=True)


# ---------------------------------------------------------------------------------- reading
def _int(d: dict[str, Any], key: str, lo: int | None = None, hi: int | None = None) -> int:
    v = d[key]
    # bool is an int subclass in Python; on the wire it is a different type, refuse it.
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"mask.v1 key {key!r} must be an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise WireError(f"mask.v1 key {key!r}={v} is out of range [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str):
        raise WireError(f"mask.v1 key {key!r} must be a string, got {type(v).__name__}")
    return v


def unpack_limits(max_side: int = MAX_SIDE) -> dict[str, int]:
    """msgpack ``unpackb`` limits for payloads with masks of at most ``max_side`` per side."""
    return {
        "max_bin_len": max_side * max_side,
        "max_str_len": MAX_STR,
        "max_array_len": MAX_INSTANCES,
        "max_map_len": 64,
        "max_ext_len": 0,
    }


def _decode_mask(data: bytes, encoding: str, w: int, h: int) -> np.ndarray:
    n = w * h
    if encoding == "u8":
        raw = data
    else:  # zlib-u8; the output is capped at w*h bytes, so a zlib bomb costs at most that
        d = zlib.decompressobj()
        try:
            raw = d.decompress(data, n)
        except zlib.error as e:
            raise WireError(f"mask.v1 mask is not valid zlib data ({e})") from None
        if d.unconsumed_tail:
            raise WireError(f"mask.v1 zlib mask inflates to more than width*height={n} bytes; rejected")
        if not d.eof:
            raise WireError("mask.v1 zlib mask is truncated (stream does not end)")
        if d.unused_data:
            raise WireError("mask.v1 zlib mask has trailing bytes after the zlib stream")
    if len(raw) != n:
        raise WireError(f"mask.v1 mask has {len(raw)} bytes, expected width*height = {w}*{h} = {n}")
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(h, w)
    return arr


def _decode_instance(obj: Any, w: int, h: int, k: int) -> Instance:
    if not isinstance(obj, dict):
        raise WireError(f"mask.v1 instances[{k}] must be a map, got {type(obj).__name__}")
    for key in ("id", "class", "bbox", "area"):
        if key not in obj:
            raise WireError(f"mask.v1 instances[{k}] lacks key {key!r}; needs id, class, bbox, area")
    bbox = obj["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or any(isinstance(v, bool) or not isinstance(v, int) for v in bbox)
    ):
        raise WireError(f"mask.v1 instances[{k}].bbox must be 4 integers [x0, y0, x1, y1], got {bbox!r:.80}")
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
        raise WireError(f"mask.v1 instances[{k}].bbox {bbox} is outside the {w}x{h} mask or inverted")
    return Instance(
        id=_int(obj, "id"),
        cls=_int(obj, "class", 0, 255),
        bbox=(x0, y0, x1, y1),
        area=_int(obj, "area", 0, w * h),
    )


def decode(payload: bytes, *, max_side: int = MAX_SIDE) -> MaskMessage:
    """Decode and validate one ``mask.v1`` payload; raises :class:`WireError`.

    Unknown keys are ignored.  Sizes are capped before allocation (see module doc).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"mask.v1 payload must be bytes, got {type(payload).__name__}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, **unpack_limits(max_side))
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        # ValueError covers ExtraData, FormatError, StackError and the max_*_len limits.
        raise WireError(f"payload is not a valid msgpack mask.v1 map ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise WireError(f"mask.v1 payload must be a msgpack map, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise WireError(f"unsupported schema {schema!r:.60}; this reader understands {SCHEMA!r} only")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise WireError(f"mask.v1 message lacks key(s) {', '.join(missing)}")
    w = _int(obj, "width", 1, max_side)
    h = _int(obj, "height", 1, max_side)
    encoding = _str(obj, "encoding")
    if encoding not in ENCODINGS:
        raise WireError(f"mask.v1 encoding {encoding!r:.40} is unknown; allowed: {', '.join(ENCODINGS)}")
    data = obj["mask"]
    if not isinstance(data, bytes):
        raise WireError(f"mask.v1 key 'mask' must be binary, got {type(data).__name__}")
    mask = _decode_mask(data, encoding, w, h)
    inst = obj["instances"]
    if not isinstance(inst, list):
        raise WireError(f"mask.v1 key 'instances' must be a list, got {type(inst).__name__}")
    t0 = _int(obj, "t0_us")
    t1 = _int(obj, "t1_us")
    if t1 < t0:
        raise WireError(f"mask.v1 t1_us={t1} is before t0_us={t0}")
    return MaskMessage(
        seq=_int(obj, "seq", 0),
        step=_int(obj, "step", 0),
        t0_us=t0,
        t1_us=t1,
        width=w,
        height=h,
        mask=mask,
        n_events=_int(obj, "n_events", 0),
        instances=tuple(_decode_instance(o, w, h, k) for k, o in enumerate(inst)),
        latency_us=_int(obj, "latency_us"),
        source=_str(obj, "source"),
        encoding=encoding,
        schema=SCHEMA,
        nbytes=len(payload),
    )
