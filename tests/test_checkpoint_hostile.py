"""checkpoint.load against hostile and broken files (issue 17, items 4-10): files outside the
checkpoint directory, FIFOs, NaN codes and overflowing scales, malformed JSON, modules that cannot
take an fp8 weight, silent casts, duplicate header keys. Every case raises a CheckpointError naming
the file (and the tensor or field) and leaves the model exactly as it was."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import LAST, TinyDeepSeekish, _assert_unchanged, _snapshot, _write_foreign_checkpoint
from torch import nn

from torch_fp8_blockwise import checkpoint
from torch_fp8_blockwise.checkpoint import CheckpointDtypeError, CheckpointError, CorruptCheckpointError
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, fp8_ineligible_reason, quantize_model_

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _load_fails(root, words: str | tuple[str, ...], exc: type = CheckpointError, model=None) -> str:
    """checkpoint.load raises ``exc`` whose message holds every one of ``words``; the model is unchanged."""
    model = TinyDeepSeekish() if model is None else model
    snap = _snapshot(model)
    with pytest.raises(exc) as info:
        checkpoint.load(model, root)
    message = str(info.value)
    for w in (words,) if isinstance(words, str) else words:
        assert w in message, message
    _assert_unchanged(model, snap)
    return message


def _set_index_entry(root, key: str, name) -> None:
    path = os.path.join(root, INDEX)
    with open(path) as f:
        index = json.load(f)
    index["weight_map"][key] = name
    with open(path, "w") as f:
        json.dump(index, f)


def _keys_of(root, shard: str) -> list[str]:
    with open(os.path.join(root, INDEX)) as f:
        return [k for k, v in json.load(f)["weight_map"].items() if v == shard]


# --------------------------------------------------------------------------- 4. where files live
@pytest.fixture
def sharded(tmp_path):
    """A sharded foreign checkpoint in tmp_path/ckpt, and a valid copy of its second shard outside."""
    root = tmp_path / "ckpt"
    _write_foreign_checkpoint(TinyDeepSeekish(), root, shard=True)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((root / SHARD2).read_bytes())
    return root, outside


@pytest.mark.parametrize(
    "entry, words",
    [
        ("../outside.safetensors", "not a plain relative file name"),
        ("sub/../../outside.safetensors", "not a plain relative file name"),
        ("OUTSIDE_ABS", "not a plain relative file name"),
        ("/etc/passwd", "not a plain relative file name"),
        ("", "expected a file name"),
        ("a\x00b.safetensors", "not a plain relative file name"),
        (["x"], "expected a file name"),
        (None, "expected a file name"),
    ],
)
def test_index_entry_outside_the_directory_is_refused(sharded, entry, words) -> None:
    root, outside = sharded
    entry = str(outside) if entry == "OUTSIDE_ABS" else entry
    for key in _keys_of(root, SHARD2):  # every key of shard 2 now points at the entry
        _set_index_entry(root, key, entry)
    message = _load_fails(root, (words, INDEX, "weight_map["))
    assert "cannot read" not in message


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_symlink_out_of_the_directory_is_refused(sharded, kind) -> None:
    root, outside = sharded
    if kind == "file":
        (root / SHARD2).unlink()
        (root / SHARD2).symlink_to(outside)
    else:  # the entry names a file in a subdirectory that is a symlink to elsewhere
        os.symlink(outside.parent, root / "sub")
        for key in _keys_of(root, SHARD2):
            _set_index_entry(root, key, "sub/outside.safetensors")
    _load_fails(root, ("resolves to", "outside the checkpoint directory", str(outside)))


def test_symlinked_index_and_config_outside_are_refused(sharded, tmp_path) -> None:
    root, _ = sharded
    for name in (INDEX, "config.json"):
        moved = tmp_path / f"moved-{name}"
        (root / name).rename(moved)
        (root / name).symlink_to(moved)
        _load_fails(root, ("outside the checkpoint directory", name))
        (root / name).unlink()
        moved.rename(root / name)


def test_symlinks_inside_the_directory_and_the_hf_cache_layout_load(tmp_path) -> None:
    """Inside the directory any symlink works; the Hugging Face cache's snapshots/<rev>/<file> ->
    ../../blobs/<hash> works too (the blob lies outside the snapshot directory)."""
    plain = tmp_path / "plain"
    _write_foreign_checkpoint(TinyDeepSeekish(), plain, shard=True)
    (plain / "real").mkdir()
    (plain / SHARD2).rename(plain / "real" / "shard2")
    (plain / SHARD2).symlink_to("real/shard2")

    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(plain))):
        if name == "real":
            continue
        (repo / "blobs" / f"blob{i}").write_bytes((plain / name).read_bytes())
        (snapshot / name).symlink_to(f"../../blobs/blob{i}")

    for root in (plain, snapshot):
        model = TinyDeepSeekish()
        summary = checkpoint.load(model, root)
        assert len(summary.converted) == 6, root


def test_hf_layout_with_a_symlinked_blobs_folder_is_refused(tmp_path, sharded) -> None:
    """A "blobs" that is itself a symlink could point at /: it is not taken as the cache's."""
    root, outside = sharded
    repo = tmp_path / "repo"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (repo / "blobs").symlink_to(outside.parent)
    for name in os.listdir(root):
        target = f"../../blobs/{'outside.safetensors' if name == SHARD2 else 'ckpt/' + name}"
        (snapshot / name).symlink_to(target)
    _load_fails(snapshot, "outside the checkpoint directory")


def test_a_directory_or_device_as_a_shard_is_refused(sharded) -> None:
    root, _ = sharded
    (root / SHARD2).unlink()
    (root / SHARD2).mkdir()
    _load_fails(root, ("is a directory, expected a regular file", SHARD2))
    os.rmdir(root / SHARD2)
    if os.path.exists("/dev/zero"):
        (root / SHARD2).symlink_to("/dev/zero")  # outside: refused before its kind matters
        _load_fails(root, "outside the checkpoint directory")


_FIFO_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import TinyDeepSeekish, _write_foreign_checkpoint
    from torch_fp8_blockwise import checkpoint
    from torch_fp8_blockwise.checkpoint import CheckpointError
    base = {base!r}
    for i, (shard, name) in enumerate([(True, "{shard2}"), (True, "{index}"), (True, "config.json"),
                                       (False, "model.safetensors")]):
        root = os.path.join(base, str(i))
        _write_foreign_checkpoint(TinyDeepSeekish(), root, shard=shard)
        os.remove(os.path.join(root, name))
        os.mkfifo(os.path.join(root, name))  # no writer: a blocking open() never returns
        try:
            checkpoint.load(TinyDeepSeekish(), root)
            print(name, "LOADED")
        except CheckpointError as e:
            print(name, "is a FIFO" in str(e) and name in str(e))
    """
)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_files_are_refused_without_hanging(tmp_path) -> None:
    """A FIFO as a shard, as the index, as config.json or as model.safetensors: refused at once.
    In a subprocess with a timeout, so a regression hangs one test, not the suite."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = _FIFO_SCRIPT.format(tests=tests, base=str(tmp_path), shard2=SHARD2, index=INDEX)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(tests), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    lines = out.stdout.split("\n")
    assert [line.split()[-1] for line in lines if line] == ["True"] * 4, out.stdout


# ------------------------------------------------------------------------ 5. values in the files
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_e4m3_nan_code_in_a_weight_is_refused(tmp_path, code) -> None:
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    w = tensors[f"{LAST}.weight"].view(torch.uint8).clone()
    w[3, 5] = code
    tensors[f"{LAST}.weight"] = w.view(E4M3)
    save_file(tensors, tmp_path / "model.safetensors")
    _load_fails(tmp_path, (f"{LAST}.weight in ", "model.safetensors", f"0x{code:02X} at (3, 5)", "NaN"))


@pytest.mark.parametrize("code", [0x7C, 0xFC, 0x7D, 0xFF])  # +inf, -inf, NaN, NaN
def test_e5m2_inf_and_nan_codes_are_refused(tmp_path, code) -> None:
    model = TinyDeepSeekish()
    quantize_model_(model, Fp8Config(dtype=E5M2), progress=False)
    checkpoint.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    w = tensors[f"{LAST}.weight"].view(torch.uint8).clone()
    w[-1, -1] = code
    tensors[f"{LAST}.weight"] = w.view(E5M2)
    save_file(tensors, tmp_path / "model.safetensors")
    _load_fails(tmp_path, (f"{LAST}.weight in ", f"0x{code:02X} at (255, 319)", "NaN or inf"))


def test_max_scale_is_float32_max_over_fp8_max() -> None:
    f32max = torch.finfo(torch.float32).max
    assert checkpoint.max_scale(E4M3, "fp32") == pytest.approx(f32max / 448, rel=1e-6)
    assert checkpoint.max_scale(E5M2, "fp32") == pytest.approx(f32max / 57344, rel=1e-6)
    assert checkpoint.max_scale(E4M3, "ue8m0") == 2.0**120 and checkpoint.max_scale(E5M2, "ue8m0") == 2.0**113
    # A scale our quantizer computes from the largest finite float32 is exactly the bound.
    w = torch.full((128, 128), f32max)
    for dtype in (E4M3, E5M2):
        for fmt in ("fp32", "ue8m0"):
            _, s = torch.ops.fp8.quantize(w, [128, 128], dtype, fmt)
            assert s.item() == checkpoint.max_scale(dtype, fmt), (dtype, fmt)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("which", ["bound", "above", "3e38", "inf", "nan", "zero"])
def test_scale_bound(tmp_path, fmt, which) -> None:
    """weight_scale_inv in (0, max_scale]: the bound itself loads, the next float32 up does not."""
    dtype = {"e4m3": E4M3, "e5m2": E5M2}[fmt]
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path, config_extra={"fmt": fmt})
    for key in [k for k in tensors if k.endswith("proj.weight")]:
        tensors[key] = tensors[key].float().to(dtype)
    bound = torch.tensor(checkpoint.max_scale(dtype, "fp32"))
    value = {
        "bound": bound,
        "above": torch.nextafter(bound, torch.tensor(math.inf)),
        "3e38": torch.tensor(3e38),
        "inf": torch.tensor(math.inf),
        "nan": torch.tensor(math.nan),
        "zero": torch.tensor(0.0),
    }[which]
    tensors[f"{LAST}.weight_scale_inv"][1, 2] = value
    save_file(tensors, tmp_path / "model.safetensors")
    if which == "bound":
        checkpoint.load(model := TinyDeepSeekish(), tmp_path)
        assert model.model.layers[1].down_proj.weight_scale_inv[1, 2] == bound
    else:
        _load_fails(tmp_path, (f"{LAST}.weight_scale_inv in ", "model.safetensors", "at (1, 2)", "at most"))


def test_min_sqnr_gate_treats_nan_as_failing() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight[7, 9] = float("nan")
        model[1].weight[0, 0] = float("inf")
    summary = quantize_model_(model, min_sqnr_db=20, progress=False)
    assert not summary.converted and all(type(m) is nn.Linear for m in model)
    assert "SQNR nan (the weight holds NaN or inf) < min_sqnr_db 20 dB" in summary.skipped["0"]
    assert "nan" in summary.skipped["1"]
    with pytest.raises(ValueError, match="min_sqnr_db: .* got nan"):
        quantize_model_(model, min_sqnr_db=float("nan"), progress=False)


# ----------------------------------------------------------------------------- 6. malformed JSON
_DEEP = b"[" * 100_000 + b"]" * 100_000
_Q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _config(**quant) -> bytes:
    return json.dumps({"quantization_config": {**_Q, **quant}}).encode()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"[1, 2]", "expected a JSON object, got list [1, 2]"),
        (b'"fp8"', "expected a JSON object, got str"),
        (b'{"quantization_config": "fp8"}', "quantization_config: expected an object, got str 'fp8'"),
        (b'{"quantization_config": [1]}', "quantization_config: expected an object, got list"),
        (_config(fmt=["e4m3"]), "quantization_config.fmt: expected one of 'e4m3', 'e5m2', got list ['e4m3']"),
        (_config(fmt={"a": 1}), "quantization_config.fmt: expected one of"),
        (
            _config(quant_method=None),
            "quantization_config.quant_method: expected one of 'fp8', 'compressed-tensors', got NoneType",
        ),
        (_config(scale_fmt=["ue8m0"]), "quantization_config.scale_fmt: expected one of"),
        (_config(activation_scheme={"x": 1}), "quantization_config.activation_scheme: expected one of"),
        (_config(weight_block_size=[128, True]), "quantization_config.weight_block_size: list [128, True]"),
        (_config(weight_block_size="128"), "quantization_config.weight_block_size: str '128'"),
        (
            _config(modules_to_not_convert="lm_head"),
            "modules_to_not_convert: expected a list of module names",
        ),
        (_config(modules_to_not_convert=[1]), "modules_to_not_convert: expected a list of module names"),
        (b'{"quantization_config": {"fmt": "e5m2", "fmt": "e4m3"}}', "key 'fmt' appears more than once"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8 text"),
        (b'{"a": 1' + b"9" * 5000 + b"}", "not valid JSON"),  # int beyond Python's 4300 digits
        (b'{"quantization_config": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (_DEEP, "JSON nested too deeply"),
    ],
)
def test_malformed_config_json(tmp_path, content, words) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    _load_fails(tmp_path, (words, "config.json"))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"[1]", "expected a JSON object, got list [1]"),
        (b'{"metadata": {}}', "weight_map: expected an object {tensor name: file name}, got NoneType None"),
        (b'{"weight_map": ["a", "b"]}', "weight_map: expected an object {tensor name: file name}, got list"),
        (b'{"weight_map": null}', "weight_map: expected an object"),
        (
            b'{"weight_map": {"model.norm.weight": null}}',
            "weight_map['model.norm.weight']: expected a file name",
        ),
        (
            b'{"weight_map": {"model.norm.weight": 5}}',
            "weight_map['model.norm.weight']: expected a file name",
        ),
        (
            b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "' + SHARD2.encode() + b'"}}',
            "key 'a' appears more than once",
        ),
        (b'{"metadata": 3, "weight_map": {}}', "metadata: expected an object, got int 3"),
        (b"\x80abc", "not UTF-8 text"),
        (_DEEP, "JSON nested too deeply"),
    ],
)
def test_malformed_index_json(tmp_path, content, words) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path, shard=True)
    (tmp_path / INDEX).write_bytes(content)
    _load_fails(tmp_path, (words, INDEX))


# ------------------------------------------------------------------- 7. one eligibility rule
class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(128, 2, batch_first=True)
        self.proj = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_mha_out_proj_is_refused_by_load_as_quantize_model_skips_it(tmp_path) -> None:
    model = WithAttention()
    summary = quantize_model_(model, progress=False)
    reason = fp8_ineligible_reason(model.attn.out_proj, [model.attn])
    assert summary.skipped["attn.out_proj"] == reason and "MultiheadAttention" in reason
    assert list(summary.converted) == ["proj"]

    # A file with an fp8 out_proj (another producer's): load refuses it, with the same reason.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    fp8 = Fp8BlockwiseLinear.from_linear(WithAttention().attn.out_proj)
    tensors["attn.out_proj.weight"], tensors["attn.out_proj.weight_scale_inv"] = (
        fp8.weight,
        fp8.weight_scale_inv,
    )
    save_file(tensors, tmp_path / "model.safetensors")
    fresh = WithAttention()
    message = _load_fails(tmp_path, ("attn.out_proj: ", "model.safetensors", reason), model=fresh)
    assert "cannot be an Fp8BlockwiseLinear" in message


def test_ineligibility_rule() -> None:
    mha = nn.MultiheadAttention(128, 2)
    assert fp8_ineligible_reason(nn.Linear(4, 4)) is None
    assert fp8_ineligible_reason(Fp8BlockwiseLinear(128, 128)) is None
    assert "MultiheadAttention" in fp8_ineligible_reason(mha.out_proj, [nn.Sequential(), mha])
    assert fp8_ineligible_reason(nn.Embedding(3, 4)).startswith("of type Embedding, not an nn.Linear")


# ------------------------------------------------------------------------ 8. what save writes
def test_save_always_writes_modules_to_not_convert(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path / "all")
    quant = json.loads((tmp_path / "all" / "config.json").read_text())["quantization_config"]
    assert quant["modules_to_not_convert"] == []

    model = WithAttention()  # out_proj is a NonDynamicallyQuantizableLinear, a subclass of nn.Linear
    quantize_model_(model, progress=False)
    checkpoint.save(model, tmp_path / "mha")
    quant = json.loads((tmp_path / "mha" / "config.json").read_text())["quantization_config"]
    assert quant["modules_to_not_convert"] == ["attn.out_proj"]


# ----------------------------------------------------------------------------- 9. messages
def test_fp8_weight_on_an_embedding_says_what_the_module_is(tmp_path) -> None:
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    q, s = checkpoint_quantize(tensors["model.embed_tokens.weight"].float())
    tensors["model.embed_tokens.weight"], tensors["model.embed_tokens.weight_scale_inv"] = q, s
    save_file(tensors, tmp_path / "model.safetensors")
    message = _load_fails(
        tmp_path,
        (
            "model.embed_tokens.weight in ",
            "model.safetensors",
            "model.embed_tokens is of type Embedding, not an nn.Linear",
        ),
        CheckpointDtypeError,
    )
    assert "no model.embed_tokens.weight_scale_inv" not in message


def checkpoint_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fp8.quantize(w, [128, 128], E4M3, "fp32")


def test_compressed_tensors_scale_name_under_an_fp8_config_is_named(tmp_path) -> None:
    tensors = _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    tensors[f"{LAST}.weight_scale"] = tensors.pop(f"{LAST}.weight_scale_inv")
    save_file(tensors, tmp_path / "model.safetensors")
    _load_fails(
        tmp_path,
        (f"{LAST}.weight_scale_inv: missing; found {LAST}.weight_scale in ", "compressed-tensors", "'fp8'"),
    )


# ----------------------------------------------------------------- 10. casts and duplicate keys
class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 128)
        self.register_buffer("step", torch.tensor(3))
        self.register_buffer("mask", torch.tensor([True, False, True]))


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("step", torch.tensor(True), "step in "),
        ("mask", torch.tensor([1, 0, 1]), "mask in "),
        (
            "step",
            torch.tensor(3, dtype=torch.int32),
            "expected torch.int64 (the model's dtype), got torch.int32",
        ),
        ("step", torch.tensor(3.0), "expected torch.int64 (the model's dtype), got torch.float32"),
        ("mask", torch.tensor([1.0, 0.0, 1.0]), "expected torch.bool"),
    ],
)
def test_int_and_bool_tensors_are_never_cast(tmp_path, key, value, words) -> None:
    model = WithBuffers()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors[key] = value
    save_file(tensors, tmp_path / "model.safetensors")
    fresh = WithBuffers()
    _load_fails(
        tmp_path, (words, "model.safetensors", "no int, bool or fp8 cast"), CheckpointDtypeError, fresh
    )


def test_bool_tensor_with_bytes_other_than_0_and_1_is_refused(tmp_path) -> None:
    model = WithBuffers()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["mask"] = torch.tensor([1, 7, 0], dtype=torch.uint8).view(torch.bool)
    save_file(tensors, tmp_path / "model.safetensors")
    _load_fails(tmp_path, ("mask in ", "bytes other than 0 and 1"), model=WithBuffers())


def test_float_tensors_take_the_models_dtype_also_on_meta(tmp_path) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)  # norms and embeddings in bfloat16
    with torch.device("meta"):
        model = TinyDeepSeekish()
    checkpoint.load(model, tmp_path)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].q_proj.bias.dtype == torch.float32  # the fp8 layer's bias too


def _rewrite_header(path, edit) -> None:
    """Replace the JSON header of safetensors file ``path`` by ``edit(header_text)``; the data stays."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    text = edit(data[8 : 8 + n].decode())
    head = text.encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data[8 + n :])


def test_duplicate_key_in_a_safetensors_header_is_refused(tmp_path) -> None:
    """safetensors keeps the last of two entries with one name: here the norm's bfloat16 bits would
    be read as float16 without a word."""
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    path = tmp_path / "model.safetensors"

    def duplicate(text: str) -> str:
        text = text.rstrip()  # safetensors pads the header with spaces
        header = json.loads(text)
        entry = header["model.norm.weight"]
        assert entry["dtype"] == "BF16"
        twin = json.dumps({**entry, "dtype": "F16"})
        return text[:-1] + ', "model.norm.weight": ' + twin + "}"

    _rewrite_header(path, duplicate)
    _load_fails(
        tmp_path,
        ("model.safetensors: safetensors header: key 'model.norm.weight' appears more than once",),
        CorruptCheckpointError,
    )


@pytest.mark.parametrize("length", [2**64 - 1, 100_000_001, 10**9])
def test_header_length_beyond_the_file_or_the_bound(tmp_path, length) -> None:
    _write_foreign_checkpoint(TinyDeepSeekish(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    _load_fails(
        tmp_path, (f"header length {length} does not fit", "model.safetensors"), CorruptCheckpointError
    )
