"""Fuzzing checkpoint.load: hypothesis mutates a small valid sharded checkpoint (safetensors headers
and data, the offsets in the headers, the index, config.json), as bytes and as JSON values. Every
example must end in a CheckpointError with the model unchanged, or in a load whose every tensor is
what the files hold; any other exception fails. (No mutation can make a FIFO: the hang is
test_checkpoint_hostile.test_fifo_files_are_refused_without_hanging.)

FP8_FUZZ_EXAMPLES sets the examples per category (default 60: 5 categories, 300 in CI, ~15 s);
FP8_FUZZ_REPORT=path appends one JSON line per example (category, outcome) for counting."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_checkpoint import _assert_unchanged, _snapshot
from torch import nn

from torch_fp8_blockwise import checkpoint
from torch_fp8_blockwise.checkpoint import CheckpointError
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, quantize_model_

EXAMPLES = int(os.environ.get("FP8_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Small(nn.Module):
    """Every kind of tensor the loader handles: an fp8 Linear with bias, a Linear kept in high
    precision, an embedding, a norm, an int64 and a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 128)
        self.proj = nn.Linear(256, 128)
        self.head = nn.Linear(128, 8, bias=False)
        self.norm = nn.LayerNorm(128)
        self.register_buffer("step", torch.tensor(3))
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _fresh() -> Small:
    torch.manual_seed(1)
    return Small()


@pytest.fixture(scope="module")
def pristine():
    """A valid checkpoint: 4 shards, the index, config.json (proj in fp8, the rest in float32)."""
    root = tempfile.mkdtemp(prefix="fp8-fuzz-")
    torch.manual_seed(0)
    model = Small()
    quantize_model_(model, filter_fn=lambda m, fqn: fqn == "proj", progress=False)
    checkpoint.save(model, root, max_shard_bytes=6000)
    loaded = _fresh()
    checkpoint.load(loaded, root)  # the pristine checkpoint loads
    assert isinstance(loaded.proj, Fp8BlockwiseLinear)
    yield root
    shutil.rmtree(root)


def _record(category: str, outcome: str) -> None:
    path = os.environ.get("FP8_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"category": category, "outcome": outcome}) + "\n")


def _assert_loaded_what_the_files_hold(model: nn.Module, root: str) -> None:
    on_disk: dict[str, torch.Tensor] = {}
    for name in os.listdir(root):
        if name.endswith(".safetensors"):
            for key, t in load_file(os.path.join(root, name)).items():
                assert key not in on_disk, key
                on_disk[key] = t
    # What load accepts is valid: finite fp8 codes, scales in (0, max_scale], bools 0 or 1.
    layer = model.proj
    assert not ((layer.weight.view(torch.uint8) & 0x7F) == 0x7F).any()
    bound = checkpoint.max_scale(layer.config.dtype, layer.config.scale_format)
    assert ((layer.weight_scale_inv > 0) & (layer.weight_scale_inv <= bound)).all()
    assert int(model.mask.view(torch.uint8).max()) <= 1
    for key, t in model.state_dict().items():
        file_t = on_disk[key]
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            assert file_t.dtype == t.dtype and torch.equal(file_t.view(torch.uint8), t.view(torch.uint8)), key
        else:
            torch.testing.assert_close(t, file_t.to(t.dtype), rtol=0, atol=0, equal_nan=True, msg=key)


def _run(root: str, category: str) -> None:
    model = _fresh()
    snap = _snapshot(model)
    try:
        checkpoint.load(model, root)
    except CheckpointError as e:
        _assert_unchanged(model, snap)
        _record(category, f"{type(e).__name__}: {_kind(str(e))}")
        return
    _assert_loaded_what_the_files_hold(model, root)
    _record(category, "loaded")


def _kind(message: str) -> str:
    """A short class of an error message, for counting."""
    for words in (
        "appears more than once",
        "not UTF-8",
        "nested too deeply",
        "not valid JSON",
        "expected a JSON object",
        "header length",
        "not a plain relative file name",
        "expected a file name",
        "outside the checkpoint",
        "cannot read",
        "NaN or inf",
        "at most",
        "not powers of two",
        "expected shape",
        "expected torch.float8",
        "expected float32 scales",
        "no int, bool or fp8 cast",
        "bytes other than 0 and 1",
        "is a directory",
        "not an nn.Linear",
        "missing",
        "unexpected",
        "listed in the index",
        "in both",
        "quantization_config",
        "weight_map",
        "metadata",
    ):
        if words in message:
            return words
    return message[:80]


def _copy(pristine: str) -> str:
    root = tempfile.mkdtemp(prefix="fp8-fuzz-case-")
    for name in os.listdir(pristine):
        shutil.copyfile(os.path.join(pristine, name), os.path.join(root, name))
    return root


def _header_span(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


# A byte-level edit: (kind, position in [0, 1), length, bytes).
_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["xor", "set", "insert", "delete", "truncate"]),
        st.floats(0, 1, exclude_max=True),
        st.integers(1, 8),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def _edit_bytes(data: bytes, lo: int, hi: int, edits) -> bytes:
    """Apply ``edits`` to data[lo:hi] (positions relative to that span)."""
    buf = bytearray(data)
    for kind, where, length, payload in edits:
        span = max(hi - lo, 1)
        i = min(lo + int(where * span), len(buf))
        if kind == "xor" and i < len(buf):
            buf[i] ^= payload[0] or 0xFF
        elif kind == "set":
            buf[i : i + len(payload)] = payload
        elif kind == "insert":
            buf[i:i] = payload
        elif kind == "delete":
            del buf[i : i + length]
        elif kind == "truncate":
            del buf[i:]
        hi = max(lo, min(hi, len(buf)))
    return bytes(buf)


def _shards(pristine: str) -> list[str]:
    return sorted(n for n in os.listdir(pristine) if n.endswith(".safetensors"))


@FUZZ
@given(data=st.data(), region=st.sampled_from(["header", "data", "anywhere"]), edits=_EDITS)
def test_fuzz_safetensors_bytes(pristine, data, region, edits) -> None:
    name = data.draw(st.sampled_from(_shards(pristine)))
    root = _copy(pristine)
    try:
        path = os.path.join(root, name)
        raw = open(path, "rb").read()
        lo, hi = {"header": (0, _header_span(raw)), "data": (_header_span(raw), len(raw))}.get(
            region, (0, len(raw))
        )
        open(path, "wb").write(_edit_bytes(raw, lo, hi, edits))
        _run(root, f"safetensors bytes ({region})")
    finally:
        shutil.rmtree(root)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
#: Values a header field plausibly gets wrong: other dtypes, shapes and offsets off by a little.
_HEADER_VALUES = (
    st.sampled_from(
        [
            "F32",
            "F16",
            "BF16",
            "F64",
            "I64",
            "I32",
            "I8",
            "U8",
            "BOOL",
            "F8_E4M3",
            "F8_E5M2",
            "F8_E8M0",
            "C64",
            "XX",
        ]
    )
    | st.lists(st.integers(-2, 300), max_size=3)
    | st.integers(-1, 70000)
    | _JSON
)


def _paths(value, prefix=()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_json(data, doc, values):
    """Replace, delete or add one value somewhere in ``doc`` (a parsed JSON object)."""
    path = data.draw(st.sampled_from(_paths(doc)))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return data.draw(values) if action == "replace" else doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if action == "replace":
        parent[path[-1]] = data.draw(values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=20))] = data.draw(values)
    else:
        parent.append(data.draw(values))
    return doc


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_values(pristine, data) -> None:
    """Header fields (dtype, shape, data_offsets, names, __metadata__) changed as JSON, the length
    prefix rewritten to match: the checks past the JSON parse are reached."""
    name = data.draw(st.sampled_from(_shards(pristine)))
    root = _copy(pristine)
    try:
        path = os.path.join(root, name)
        raw = open(path, "rb").read()
        n = _header_span(raw)
        header = _mutate_json(data, json.loads(raw[8:n]), _HEADER_VALUES)
        head = json.dumps(header).encode()
        open(path, "wb").write(struct.pack("<Q", len(head)) + head + raw[n:])
        _run(root, "safetensors header values")
    finally:
        shutil.rmtree(root)


_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_SPECIAL_F32 = st.sampled_from(
    [math.nan, math.inf, -math.inf, 0.0, -1.0, 3e38, 1e36, 7.6e35, 1e-45]
) | st.floats(width=32)


@FUZZ
@given(data=st.data())
def test_fuzz_tensor_values(pristine, data) -> None:
    """One element of one tensor set to a drawn value: any byte for fp8 (NaN codes included),
    special floats for float32 (scales: NaN, inf, 0, negative, past max_scale), any bytes else."""
    name = data.draw(st.sampled_from(_shards(pristine)))
    root = _copy(pristine)
    try:
        path = os.path.join(root, name)
        raw = bytearray(open(path, "rb").read())
        n = _header_span(raw)
        header = json.loads(raw[8:n])
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = header[key]
        size = _SIZES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        at = n + begin + size * data.draw(st.integers(0, (end - begin) // size - 1))
        if entry["dtype"] == "F32":
            value = struct.pack("<f", data.draw(_SPECIAL_F32))
        elif entry["dtype"] in ("F8_E4M3", "F8_E5M2", "BOOL"):  # NaN / inf codes, bools not 0 or 1
            value = bytes(
                [data.draw(st.sampled_from([0x7F, 0xFF, 0x7C, 0xFC, 0x7E, 0x80, 2]) | st.integers(0, 255))]
            )
        else:
            value = data.draw(st.binary(min_size=size, max_size=size))
        raw[at : at + size] = value
        open(path, "wb").write(bytes(raw))
        _run(root, f"tensor values ({entry['dtype']})")
    finally:
        shutil.rmtree(root)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["config.json", "model.safetensors.index.json"]), edits=_EDITS)
def test_fuzz_json_bytes(pristine, data, which, edits) -> None:
    root = _copy(pristine)
    try:
        path = os.path.join(root, which)
        raw = open(path, "rb").read()
        open(path, "wb").write(_edit_bytes(raw, 0, len(raw), edits))
        _run(root, f"{which} bytes")
    finally:
        shutil.rmtree(root)


#: Index entries: the real shards, and names that must be refused.
_BAD_NAMES = ["../x.safetensors", "/etc/passwd", ".", "", "a/../b", "config.json", "nonexistent", "sub/x"]


@FUZZ
@given(data=st.data(), which=st.sampled_from(["config.json", "model.safetensors.index.json"]))
def test_fuzz_json_values(pristine, data, which) -> None:
    root = _copy(pristine)
    try:
        path = os.path.join(root, which)
        doc = json.loads(open(path, "rb").read())
        names = st.sampled_from(_shards(pristine) + _BAD_NAMES)
        doc = _mutate_json(data, doc, names | _JSON if "index" in which else _JSON)
        with open(path, "w") as f:
            json.dump(doc, f)
        _run(root, f"{which} values")
    finally:
        shutil.rmtree(root)
