"""Property tests of the pure layers: codec round trips and hostile frames, key
slicing by range, key validation, and the per-server Table store."""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import psd
from psd.cluster.ranges import KEY_SPACE_END, Range, as_keys, split_sorted, split_span
from psd.codec import DTYPES, Limits, Message, decode, encode
from psd.codec.frames import ZSTD_MIN_BYTES
from psd.store import Table, TableSpec

TOP = 2**64 - 1
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------
ints64 = st.integers(-(2**63), 2**63 - 1)
msgpack_scalars = (st.none() | st.booleans() | ints64 | st.integers(0, TOP)
                   | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def arrays(draw, min_rows: int = 0, max_rows: int = 40):
    """A random array of an allowed dtype, 1-d or 2-d (zero sizes included); big
    compressible ones sometimes, so zstd really runs."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    big = draw(st.booleans()) and draw(st.booleans())
    if big:
        rows = ZSTD_MIN_BYTES // dtype.itemsize + draw(st.integers(0, 300))
    else:
        rows = draw(st.integers(min_rows, max_rows))
    shape = (rows,) if draw(st.booleans()) else (rows, draw(st.integers(0 if not big else 1, 5)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        a = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if big and draw(st.booleans()):
        a[...] = a.flat[0] if a.size else 0  # compressible
    return a


@st.composite
def messages(draw):
    return Message(
        op=draw(st.text(min_size=1, max_size=12)),
        id=draw(ints64 | st.integers(0, TOP)),
        sender=draw(st.text(max_size=10)),
        table=draw(st.none() | st.text(max_size=10)),
        ring=draw(ints64),
        clock=draw(ints64),
        meta=draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5)),
        arrays=draw(st.lists(arrays(), max_size=4)),
    )


def as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def assert_same(a: Message, b: Message) -> None:
    assert (a.op, a.id, a.sender, a.table, a.ring, a.clock) == (b.op, b.id, b.sender, b.table, b.ring, b.clock)
    assert a.meta == b.meta
    assert len(a.arrays) == len(b.arrays)
    for x, y in zip(a.arrays, b.arrays):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit-exact, NaN payloads included


# -- codec ---------------------------------------------------------------------------------
@PROPS
@given(msg=messages(), compression=st.sampled_from(["none", "zstd"]))
def test_codec_round_trip(msg, compression):
    frames = as_bytes(encode(msg, compression))
    assert len(frames) == 1 + len(msg.arrays)
    head = msgpack.unpackb(frames[0])
    for a, (name, shape, codec, nbytes) in zip(msg.arrays, head["frames"]):
        assert name == a.dtype.str and shape == list(a.shape) and nbytes == a.nbytes
        if compression == "none" or a.nbytes < ZSTD_MIN_BYTES:
            assert codec == "none"
        if codec == "zstd":
            assert compression == "zstd"
    assert_same(decode(frames), msg)


def test_zstd_actually_compresses():
    a = np.zeros((2000, 3), dtype=np.float64)
    frames = encode(Message("push", arrays=[np.arange(2000, dtype=np.uint64), a]), "zstd")
    head = msgpack.unpackb(frames[0])
    assert head["frames"][1][2] == "zstd" and len(bytes(frames[2])) < a.nbytes // 10
    out = decode(as_bytes(frames))
    np.testing.assert_array_equal(out.arrays[1], a)


def test_encode_handles_empty_and_odd_arrays():
    """Zero-size 2-d arrays (an empty pull's answer), views and big-endian input."""
    src = np.arange(12, dtype=">i8").reshape(3, 4)
    msg = Message("ok", arrays=[np.empty((0, 3)), np.empty((5, 0), np.int32), np.empty(0, np.uint64),
                                src[:, ::2], src.T])
    out = decode(as_bytes(encode(msg)))
    assert [a.shape for a in out.arrays] == [(0, 3), (5, 0), (0,), (3, 2), (4, 3)]
    np.testing.assert_array_equal(out.arrays[3], src[:, ::2])
    np.testing.assert_array_equal(out.arrays[4], src.T)
    assert out.arrays[3].dtype == np.dtype("<i8")
    with pytest.raises(psd.ProtocolError, match="dtype"):
        encode(Message("ok", arrays=[np.zeros(3, np.complex64)]))


def _mutations():
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 10), st.integers(0, 10_000)),
        st.tuples(st.just("flip"), st.integers(0, 10), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("insert"), st.integers(0, 10), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("drop"), st.integers(0, 10)),
        st.tuples(st.just("add"), st.binary(max_size=64)),
        st.tuples(st.just("header"), st.sampled_from(["v", "op", "id", "src", "tbl", "ring", "clk", "meta",
                                                      "frames"]), msgpack_values),
        st.tuples(st.just("desc"), st.integers(0, 10), st.integers(0, 3), msgpack_values),
        st.tuples(st.just("random_header"), st.binary(max_size=64)),
    )


def _header_of(frames):
    try:
        h = msgpack.unpackb(frames[0])
    except Exception:
        return None
    return h if isinstance(h, dict) else None


def _mutate(frames: list[bytes], m) -> list[bytes]:
    frames = list(frames)
    kind = m[0]
    if not frames:
        return [m[1]] if kind in ("add", "random_header") else frames
    if kind in ("header", "desc") and _header_of(frames) is None:
        return frames
    if kind == "truncate":
        i = m[1] % len(frames)
        frames[i] = frames[i][:m[2] % (len(frames[i]) + 1)]
    elif kind == "flip":
        i = m[1] % len(frames)
        if frames[i]:
            b = bytearray(frames[i])
            b[m[2] % len(b)] ^= m[3]
            frames[i] = bytes(b)
    elif kind == "insert":
        i = m[1] % len(frames)
        p = m[2] % (len(frames[i]) + 1)
        frames[i] = frames[i][:p] + m[3] + frames[i][p:]
    elif kind == "drop":
        del frames[m[1] % len(frames)]
    elif kind == "add":
        frames.append(m[1])
    elif kind == "header":
        h = msgpack.unpackb(frames[0])
        h[m[1]] = m[2]
        frames[0] = msgpack.packb(h)
    elif kind == "desc":
        h = msgpack.unpackb(frames[0])
        if isinstance(h.get("frames"), list) and h["frames"] and isinstance(h["frames"][m[1] % len(h["frames"])], list):
            d = h["frames"][m[1] % len(h["frames"])]
            if d:
                d[m[2] % len(d)] = m[3]
            frames[0] = msgpack.packb(h)
    elif kind == "random_header":
        frames[0] = m[1]
    return frames


@PROPS
@given(msg=messages(), compression=st.sampled_from(["none", "zstd"]), mutations=st.lists(_mutations(), min_size=1,
                                                                                       max_size=3))
def test_decode_of_mutated_frames_raises_only_protocol_error(msg, compression, mutations):
    frames = as_bytes(encode(msg, compression))
    for m in mutations:
        frames = _mutate(frames, m)
    try:
        out = decode(frames, Limits(max_message_bytes=1 << 22, max_keys=1 << 16))
    except psd.ProtocolError:
        return
    # what still decodes is a complete, self-consistent message
    assert isinstance(out, Message) and isinstance(out.meta, dict)
    assert len(out.arrays) == len(frames) - 1
    for a in out.arrays:
        assert a.dtype.str in DTYPES and 1 <= a.ndim <= 2


@PROPS
@given(msg=messages(), data=st.data())
def test_truncated_or_extended_payload_is_always_rejected(msg, data):
    assume(any(a.nbytes for a in msg.arrays))
    frames = as_bytes(encode(msg))
    i = data.draw(st.sampled_from([j + 1 for j, a in enumerate(msg.arrays) if a.nbytes]))
    cut = data.draw(st.integers(0, len(frames[i]) - 1))
    with pytest.raises(psd.ProtocolError, match="bytes"):
        decode(frames[:i] + [frames[i][:cut]] + frames[i + 1:])
    with pytest.raises(psd.ProtocolError, match="bytes"):
        decode(frames[:i] + [frames[i] + b"\0"] + frames[i + 1:])


def _head(**override) -> bytes:
    h = {"v": 1, "op": "push", "id": 1, "src": "t", "tbl": "w", "ring": 0, "clk": 0, "meta": {}, "frames": []}
    h.update(override)
    return msgpack.packb(h)


@pytest.mark.parametrize("frames,cls,words", [
    ([], psd.ProtocolError, "empty"),
    ([b"\xc1"], psd.ProtocolError, "msgpack"),
    ([msgpack.packb([1, 2])], psd.ProtocolError, "map"),
    ([msgpack.packb({1: 2})], psd.ProtocolError, "msgpack"),  # non-string map keys
    ([_head(v=2)], psd.ProtocolError, "version 2"),
    ([_head(id=True)], psd.ProtocolError, "'id'"),
    ([_head(frames=[["<f8", [0, 2**62], "none", 0]]), b""], psd.MessageTooLargeError, "limits"),
    ([_head(frames=[["<f8", [2**62], "none", 2**64 - 1]]), b""], psd.MessageTooLargeError, "limits"),
    ([_head(frames=[["<f8", [2], "none", 16.5]]), b"\0" * 16], psd.ProtocolError, "declared"),
    ([_head(frames=[["<f8", [True], "none", 8]]), b"\0" * 8], psd.ProtocolError, "shape"),
    ([_head(frames=[["<f8", [1], "zstd", 8]]),
      bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", 2**44) + b"\x21\0\0abcd"],
     psd.ProtocolError, "zstd"),
    ([_head()] + [b""] * 16, psd.MessageTooLargeError, "frames"),
    ([_head(pad="x" * 70_000)], psd.MessageTooLargeError, "header"),
])
def test_decode_names_the_problem(frames, cls, words):
    with pytest.raises(cls, match=words):
        decode(frames)


# -- key ranges --------------------------------------------------------------------------
sorted_keys = st.lists(st.integers(0, TOP), max_size=60, unique=True).map(
    lambda ks: np.array(sorted(ks), dtype=np.uint64))
cut_lists = st.lists(st.integers(0, KEY_SPACE_END), max_size=8).map(sorted)


def _ranges(cuts: list[int]) -> list[Range]:
    bounds = [0, *cuts, KEY_SPACE_END]
    return [Range(a, b) for a, b in zip(bounds, bounds[1:])]


@PROPS
@given(keys=sorted_keys, cuts=cut_lists, near=st.lists(st.integers(-2, 2), max_size=8))
@example(keys=np.array([0, TOP], dtype=np.uint64), cuts=[2**63, KEY_SPACE_END], near=[])
@example(keys=np.array([TOP], dtype=np.uint64), cuts=[TOP, TOP], near=[])
def test_split_sorted_partitions_keys_by_range(keys, cuts, near):
    # put some keys exactly on and next to the cuts, where off-by-ones live
    extra = [c + d for c in cuts for d in near if 0 <= c + d <= TOP]
    keys = np.unique(np.concatenate([keys, np.array(extra, dtype=np.uint64)]))
    ranges = _ranges(cuts)
    slices = split_sorted(keys, ranges)
    assert len(slices) == len(ranges)
    pos = 0
    for (i0, i1), r in zip(slices, ranges):
        assert i0 == pos and i0 <= i1  # contiguous: together they cover every key once
        assert all(int(k) in r for k in keys[i0:i1])
        pos = i1
    assert pos == keys.size
    # each range got every key it holds (checked against plain Python)
    for (i0, i1), r in zip(slices, ranges):
        assert i1 - i0 == sum(1 for k in keys if r.begin <= int(k) < r.end)


@PROPS
@given(keys=sorted_keys, cuts=st.lists(st.integers(0, KEY_SPACE_END), min_size=2, max_size=10).map(sorted),
       pick=st.lists(st.booleans(), min_size=10, max_size=10))
def test_split_sorted_with_gaps_between_ranges(keys, cuts, pick):
    """Ranges need not cover the key space: keys in the gaps belong to no slice."""
    ranges = [Range(a, b) for (a, b), keep in zip(zip(cuts, cuts[1:]), pick) if keep]
    for (i0, i1), r in zip(split_sorted(keys, ranges), ranges):
        inside = [int(k) for k in keys if int(k) in r]
        assert [int(k) for k in keys[i0:i1]] == inside


def test_split_sorted_empty_range_at_the_top():
    keys = np.array([1, 5, TOP], dtype=np.uint64)
    assert split_sorted(keys, [Range(0, KEY_SPACE_END), Range(KEY_SPACE_END, KEY_SPACE_END)]) == [(0, 3), (3, 3)]
    assert split_sorted(np.empty(0, np.uint64), _ranges([10])) == [(0, 0), (0, 0)]


@PROPS
@given(lo=st.integers(0, TOP), n=st.integers(0, 2**20), cuts=cut_lists)
@example(lo=2**63 - 3, n=6, cuts=[2**63])
@example(lo=TOP, n=1, cuts=[TOP])
def test_split_span(lo, n, cuts):
    n = min(n, KEY_SPACE_END - lo)
    ranges = _ranges(cuts)
    parts = split_span(lo, n, ranges)
    assert len(parts) == len(ranges)
    expect_off = 0
    for (off, count), r in zip(parts, ranges):
        assert count >= 0
        if count:
            assert off == expect_off  # pieces are consecutive, in key order
            assert lo + off in r and lo + off + count - 1 in r
            expect_off += count
        # the piece is all of the span that falls in the range
        assert count == max(0, min(lo + n, r.end) - max(lo, r.begin))
    assert expect_off == n


@PROPS
@given(ks=st.lists(st.integers(0, TOP), max_size=30))
def test_as_keys_accepts_exactly_sorted_unique_uint64(ks):
    ok = all(a < b for a, b in zip(ks, ks[1:]))
    for form in (ks, np.array(ks, dtype=np.uint64)):
        if ok:
            out = as_keys(form)
            assert out.dtype == np.uint64 and out.ndim == 1
            assert [int(k) for k in out] == ks
        else:
            with pytest.raises(psd.KeysError, match="duplicate|unsorted"):
                as_keys(form)


@pytest.mark.parametrize("keys,words", [
    ([3, 1, 5], "unsorted key at position 1"),
    ([1, 3, 3], "duplicate key at position 2"),
    (np.array([2, 1], dtype=np.int32), "unsorted"),
    ([-1, 3], "non-negative"),
    ([2**63, -5], "non-negative|integers"),
    ([0, 2**64], r"\[0, 2\*\*64\)"),
    (np.array([1.0, 2.0]), "integers"),
    ([1.0, 2.0], "integers"),
    ([1, 2.5], "integers"),
    (np.array(["a", "b"]), "integers"),
    (np.array([True, False]), "integers"),
    (np.zeros((2, 2), np.uint64), "1-d"),
])
def test_as_keys_rejects(keys, words):
    with pytest.raises(psd.KeysError, match=words):
        as_keys(keys)


def test_as_keys_accepts_python_ints_above_int64():
    out = as_keys([0, 2**63, TOP])
    assert out.dtype == np.uint64 and [int(k) for k in out] == [0, 2**63, TOP]
    assert as_keys([]).dtype == np.uint64 and as_keys(()).size == 0
    np.testing.assert_array_equal(as_keys(np.array([1, 2], np.int16)), [1, 2])


def test_ranges_are_checked():
    with pytest.raises(ValueError):
        Range(5, 4)
    with pytest.raises(ValueError):
        Range(0, KEY_SPACE_END + 1)
    assert Range(0, KEY_SPACE_END).size == KEY_SPACE_END and TOP in Range(1, KEY_SPACE_END)


# -- the Table store --------------------------------------------------------------------------
def _table(dtype="int64", width=2, updater="sum", **options) -> Table:
    return Table(TableSpec("t", width, dtype, updater, options).validate())


def _model_pull(model: dict, keys, width, dtype) -> np.ndarray:
    return np.array([model.get(int(k), np.zeros(width, dtype)) for k in keys], dtype=dtype).reshape(len(keys), width)


def test_table_inserts_new_keys_between_existing_ones():
    t = _table()
    t.push(np.array([10, 30], np.uint64), np.array([[1, 1], [3, 3]], np.int64))
    t.push(np.array([5, 20, 30, 40], np.uint64), np.array([[5, 5], [2, 2], [10, 10], [4, 4]], np.int64))
    t.push(np.array([20, 25], np.uint64), np.array([[1, 0], [7, 7]], np.int64))
    assert [int(k) for k in t.keys] == [5, 10, 20, 25, 30, 40]
    np.testing.assert_array_equal(t.pull(np.array([5, 10, 20, 25, 30, 40], np.uint64)),
                                  [[5, 5], [1, 1], [3, 2], [7, 7], [13, 13], [4, 4]])
    # never-pushed keys read zero, mixed with present ones, in request order
    np.testing.assert_array_equal(t.pull(np.array([0, 5, 6, 41, TOP], np.uint64)),
                                  [[0, 0], [5, 5], [0, 0], [0, 0], [0, 0]])
    assert t.num_keys == 6  # pulls never insert


def test_table_pulls_never_alias_what_is_written_later():
    """Answers are sent zero-copy: a pulled array is either a private copy or a
    read-only view that later writes to the table do not reach."""
    t = _table()
    t.push(np.arange(5, dtype=np.uint64), np.ones((5, 2), np.int64))
    pulled = [t.pull(np.arange(5, dtype=np.uint64)), t.pull(np.array([0, 2, 4], np.uint64)),
              t.pull(np.array([0, 9], np.uint64)), t.pull_span(0, 5), t.pull_span(3, 4)]
    for got in pulled:
        if got.flags.writeable:
            got[...] = 99
    np.testing.assert_array_equal(t.pull_span(0, 5), np.ones((5, 2)))
    t.push(np.arange(5, dtype=np.uint64), np.ones((5, 2), np.int64))
    t.push_span(0, np.ones((5, 2), np.int64))
    for got in pulled:
        assert (got != 3).all()  # none saw the later pushes


def test_table_spans():
    t = _table(dtype="float32", width=1)
    t.push_span(2**63 - 2, np.array([1, 2, 3, 4], np.float32))  # new keys, 1-d values for width 1
    t.push_span(2**63 - 1, np.array([[10], [10]], np.float32))  # existing run: in place
    t.push_span(2**63 + 1, np.array([[5], [5]], np.float32))  # half existing, half new
    np.testing.assert_array_equal(t.pull_span(2**63 - 3, 7).ravel(), [0, 1, 12, 13, 9, 5, 0])
    np.testing.assert_array_equal(t.pull(np.arange(2**63 - 3, 2**63 + 4, dtype=np.uint64)).ravel(),
                                  [0, 1, 12, 13, 9, 5, 0])
    t.push_span(TOP - 1, np.array([7, 8], np.float32))
    np.testing.assert_array_equal(t.pull_span(TOP - 2, 3).ravel(), [0, 7, 8])
    assert t.pull_span(5, 0).shape == (0, 1)
    t.push_span(5, np.empty((0, 1), np.float32))
    assert t.num_keys == 7


def test_table_rejects_bad_values():
    t = _table()
    k = np.array([1, 2], np.uint64)
    with pytest.raises(psd.ValuesError, match="float64"):
        t.push(k, np.ones((2, 2)))
    with pytest.raises(psd.ValuesError, match=r"\(2, 2\)"):
        t.push(k, np.ones((2, 3), np.int64))
    with pytest.raises(psd.ValuesError):
        t.push(k, np.ones(2, np.int64))  # 1-d only for width 1
    assert t.num_keys == 0  # nothing inserted by a rejected push


def test_updaters():
    a = _table(updater="assign")
    a.push(np.array([1, 2], np.uint64), np.array([[1, 1], [2, 2]], np.int64))
    a.push(np.array([2, 3], np.uint64), np.array([[5, 5], [6, 6]], np.int64))
    np.testing.assert_array_equal(a.pull(np.array([1, 2, 3], np.uint64)), [[1, 1], [5, 5], [6, 6]])
    s = _table(dtype="float64", updater="sgd", lr=0.5)
    s.push(np.array([1, 2], np.uint64), np.array([[2, 4], [6, 8]], np.float64))
    s.push(np.array([2], np.uint64), np.array([[2, 2]], np.float64))
    np.testing.assert_array_equal(s.pull(np.array([1, 2], np.uint64)), [[-1, -2], [-4, -5]])
    with pytest.raises(psd.UnknownUpdaterError, match="'nah'"):
        _table(updater="nah")
    with pytest.raises(psd.BadRequestError, match="float"):
        _table(dtype="int32", updater="sgd")
    with pytest.raises(psd.BadRequestError, match="lr"):
        _table(dtype="float32", updater="sgd", lr=0)


@PROPS
@given(dtype=st.sampled_from(["int32", "int64", "float32", "float64"]), width=st.integers(1, 3),
       updater=st.sampled_from(["sum", "assign"]), seed=st.integers(0, 2**32 - 1),
       ops=st.lists(st.tuples(st.sampled_from(["push", "span", "pull", "pull_span"]),
                              st.integers(0, 2**32 - 1)), min_size=1, max_size=12))
def test_table_matches_a_dict_model(dtype, width, updater, seed, ops):
    t = _table(dtype, width, updater)
    model: dict[int, np.ndarray] = {}
    universe = np.array(sorted({0, 1, 2, 3, 50, 51, 52, 2**63 - 1, 2**63, TOP - 1, TOP}
                               | set(range(100, 120))), dtype=np.uint64)
    for op, s in ops:
        rng = np.random.default_rng(seed ^ s)
        if op in ("push", "pull"):
            keys = np.sort(rng.choice(universe, size=int(rng.integers(0, universe.size + 1)), replace=False))
        else:
            lo = [0, 48, 98, 2**63 - 3, TOP - 4][int(rng.integers(5))]
            keys = np.arange(lo, lo + int(rng.integers(0, 6)), dtype=np.uint64)
        if op in ("push", "span"):
            vals = rng.integers(-100, 100, size=(keys.size, width)).astype(dtype)
            if op == "push":
                t.push(keys, vals)
            else:
                t.push_span(int(keys[0]) if keys.size else 0, vals)
            for k, v in zip(keys, vals):
                k = int(k)
                model[k] = v.copy() if updater == "assign" else model.get(k, np.zeros(width, dtype)) + v
        else:
            got = t.pull(keys) if op == "pull" else t.pull_span(int(keys[0]) if keys.size else 0, keys.size)
            assert got.dtype == np.dtype(dtype) and got.shape == (keys.size, width)
            np.testing.assert_array_equal(got, _model_pull(model, keys, width, dtype))
    # storage stays sorted and unique, one row per key ever pushed
    assert [int(k) for k in t.keys] == sorted(model)
    np.testing.assert_array_equal(t.pull(np.array(sorted(model), np.uint64)),
                                  _model_pull(model, sorted(model), width, dtype))


def test_compressed_frames_cannot_expand_past_the_message_limit_together():
    from psd.codec import Limits, Message, decode, encode
    a = np.zeros(1000, np.float64)  # 8000 bytes each, compressed to a few dozen
    frames = encode(Message("push", arrays=[a, a]), compression="zstd")
    assert sum(len(f) for f in frames) < 1000
    with pytest.raises(psd.MessageTooLargeError, match="in all"):
        decode(frames, Limits(max_message_bytes=10_000))


def test_a_shape_over_the_message_limit_is_refused_even_when_empty():
    """(0 bytes of data, but a first dimension no message may have: refused, on the
    decoder's quick path too, when max_keys is set above max_message_bytes)"""
    limits = Limits(max_keys=2**40, max_message_bytes=2**20)
    with pytest.raises(psd.MessageTooLargeError, match="over limits.max_message_bytes"):
        decode([_head(frames=[["<f4", [2**30, 0], "none", 0]]), b""], limits)
