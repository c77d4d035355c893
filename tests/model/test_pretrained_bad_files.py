"""Issue 17 item 8: load_pretrained, read_safetensors and read_json on malformed files.

Every bad file is one ValueError line naming the file and the field or the limit: no raw exception,
no MemoryError, no allocation beyond the file's own size (checked with tracemalloc). The safetensors
files are written by hand here (st_bytes), so these tests need no safetensors package."""

import dataclasses
import json
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minidiff.model.config import LIMITS, get_preset, to_diffusers_config
from minidiff.model.pretrained import CONFIG_KEY, MAX_JSON_BYTES, load_pretrained, read_json, read_safetensors
from minidiff.model.unet import init_params

ROOT = Path(__file__).resolve().parents[2]
TINY = get_preset("tiny")
ST = "diffusion_pytorch_model.safetensors"
ST_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "uint8": "U8"}
PEAK_BYTES = 4 << 20  # a refused file of a few bytes may make the reader allocate at most this much


def st_bytes(arrays: dict, metadata=None) -> bytes:
    """A valid .safetensors file of arrays (the format of minidiff/model/safetensors_file.py's docstring)."""
    header, blobs, at = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, a in arrays.items():
        b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": ST_DTYPES[a.dtype.name], "shape": list(a.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    return raw(json.dumps(header).encode(), b"".join(blobs))


def raw(header: bytes, data: bytes = b"", length=None) -> bytes:
    """8-byte little-endian header length (default: the header's own), the header, the data."""
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


def one_line(err: pytest.ExceptionInfo, path, *words) -> str:
    """The error's message, after checking it is one line naming path and holding every word."""
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg and len(msg) < 600, msg
    assert str(path) in msg, (str(path), msg)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def refused(call, path, *words) -> str:
    """call() raises one ValueError line naming path and words, allocating at most PEAK_BYTES on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as err:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak:,} bytes allocated to refuse a small file"
    return one_line(err, path, *words)


# ---------------------------------------------------------------------------------------- safetensors files
A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "F64", "shape": [4], "data_offsets": [24, 56]}
DATA = bytes(56)


def head(**entries) -> bytes:
    """A header of tensors a and b (A, B above), with entries replacing or adding items."""
    return json.dumps({k: v for k, v in dict(dict(a=A, b=B), **entries).items() if v is not None}).encode()


GOOD = raw(head(), DATA)
ST_CASES = {  # id: (file bytes, words the one line must hold)
    "header_length_2**63": (raw(head(), DATA, length=2**63), "9,223,372,036,854,775,808 bytes"),
    "header_length_2**40": (raw(head(), DATA, length=2**40), "MAX_HEADER_BYTES"),
    "header_length_past_the_end_of_the_file": (raw(head(), DATA, length=len(GOOD)), "past the end of the file"),
    "header_length_0": (raw(b"", DATA + head()), "header length is 0"),
    "header_not_json": (raw(b"{not json", DATA), "not valid JSON"),
    "header_not_utf8": (raw(b'{"a\xff": 1}'), "not UTF-8"),
    "header_a_json_list": (raw(b"[1, 2]"), "must be a JSON object, got list"),
    "header_a_json_number": (raw(b"7"), "must be a JSON object, got int"),
    "header_nested_100000_deep": (raw(b"[" * 100_000), "not valid JSON"),
    "header_int_of_5000_digits": (raw(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b']}}'), "not valid JSON"),
    "a_name_given_twice": (raw(b'{"a": 1, "a": 2}'), "'a' appears twice"),
    "entry_not_an_object": (raw(head(a=[0, 24]), DATA), "tensor 'a' must be an object"),
    "entry_missing_dtype": (raw(head(a=dict(shape=[2, 3], data_offsets=[0, 24])), DATA), "has no 'dtype'"),
    "entry_missing_shape": (raw(head(a=dict(dtype="F32", data_offsets=[0, 24])), DATA), "has no 'shape'"),
    "entry_missing_data_offsets": (raw(head(a=dict(dtype="F32", shape=[2, 3])), DATA), "has no 'data_offsets'"),
    "entry_unknown_field": (raw(head(a=dict(A, strides=[3, 1])), DATA), "unknown field 'strides'"),
    "unknown_dtype": (raw(head(a=dict(A, dtype="F128")), DATA), "has dtype 'F128'"),
    "dtype_not_a_string": (raw(head(a=dict(A, dtype=32)), DATA), "has dtype 32"),
    "negative_shape": (raw(head(a=dict(A, shape=[-2, -3])), DATA), "has shape [-2, -3]"),
    "float_shape": (raw(head(a=dict(A, shape=[2.0, 3])), DATA), "has shape [2.0, 3]"),
    "bool_shape": (raw(head(a=dict(A, shape=[True, 6])), DATA), "has shape [True, 6]"),
    "shape_a_string": (raw(head(a=dict(A, shape="2x3")), DATA), "has shape '2x3'"),
    "shape_of_65_dims": (raw(head(a=dict(A, shape=[1] * 65)), DATA), "at most 64 ints"),
    "shape_product_overflows_u64": (raw(head(a=dict(A, shape=[2**62, 2**62, 6])), DATA), "hold 24"),
    "offsets_one_int": (raw(head(a=dict(A, data_offsets=[24])), DATA), "[begin, end], two ints"),
    "offsets_three_ints": (raw(head(a=dict(A, data_offsets=[0, 24, 56])), DATA), "[begin, end], two ints"),
    "offsets_floats": (raw(head(a=dict(A, data_offsets=[0.0, 24])), DATA), "[begin, end], two ints"),
    "offsets_a_string": (raw(head(a=dict(A, data_offsets="0:24")), DATA), "[begin, end], two ints"),
    "offsets_negative": (raw(head(a=dict(A, data_offsets=[-24, 0])), DATA), "0 <= begin <= end"),
    "end_past_the_end_of_the_file": (raw(head(b=dict(B, data_offsets=[24, 2**40])), DATA), "<= 56"),
    "begin_after_end": (raw(head(a=dict(A, data_offsets=[24, 0])), DATA), "0 <= begin <= end"),
    "bytes_differ_from_shape_times_itemsize": (raw(head(a=dict(A, shape=[2, 2])), DATA), "= 16 bytes"),
    "overlapping_tensors": (raw(head(b=dict(B, data_offsets=[16, 48])), DATA), "overlaps tensor 'a'"),
    "a_hole_between_tensors": (raw(head(b=dict(B, data_offsets=[32, 64])), bytes(64)), "a hole"),
    "bytes_after_the_last_tensor": (raw(head(), DATA + bytes(8)), "trailing bytes"),
    "truncated_in_the_header": (GOOD[:20], "past the end of the file"),
    "truncated_in_the_data": (GOOD[:-10], "truncated"),
    "empty_file": (b"", "the file is 0 bytes"),
    "five_bytes": (b"\x01" * 5, "the file is 5 bytes"),
    "metadata_a_list": (raw(head(__metadata__=[1]), DATA), "'__metadata__' must be an object of strings"),
    "metadata_not_strings": (raw(head(__metadata__={"format": 1}), DATA), "'__metadata__' must be an object"),
}


@pytest.mark.parametrize("reader", [read_safetensors, load_pretrained], ids=["read_safetensors", "load_pretrained"])
@pytest.mark.parametrize("case", list(ST_CASES))
def test_issue17_bad_safetensors_file_is_one_line(tmp_path, case, reader):
    data, words = ST_CASES[case]
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    refused(lambda: reader(path), path, "not a readable safetensors file", words)


def test_issue17_a_folder_where_a_safetensors_file_is_expected(tmp_path):
    (tmp_path / "m.safetensors").mkdir()
    refused(lambda: read_safetensors(tmp_path / "m.safetensors"), tmp_path / "m.safetensors", "a folder")
    folder = diffusers_folder(tmp_path / "unet")
    (folder / ST).unlink()
    (folder / ST).mkdir()
    refused(lambda: load_pretrained(folder), folder / ST, "a folder, not a file")


def test_good_safetensors_files_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((2, 3)).astype(np.float32), "f16": np.array([1.5, -2], np.float16),
              "f64": rng.standard_normal(4), "i64": np.arange(-3, 3), "empty": np.zeros((0, 5), np.float32)}
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_bytes(arrays, metadata={"format": "pt"}))
    got = read_safetensors(path)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and got[k].flags.writeable, k
        np.testing.assert_array_equal(got[k], a)
    bf16 = np.array([1.5, -2.0, 3.140625], np.float32)  # exact in bfloat16: the top 16 bits of each float32
    top = (bf16.view(np.uint32) >> 16).astype("<u2").tobytes()
    path.write_bytes(raw(json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode(), top))
    np.testing.assert_array_equal(read_safetensors(path)["w"], bf16)
    stn = pytest.importorskip("safetensors.numpy")  # the reference reader agrees
    stn.save_file(arrays, str(path), metadata={"x": "y"})
    for k, a in read_safetensors(path).items():
        np.testing.assert_array_equal(a, arrays[k])


# ------------------------------------------------------------------------------- config.json of a folder
def diffusers_folder(folder: Path, config=TINY, edit=None, edit_config=None) -> Path:
    """A UNet2DModel folder of config (weights written by st_bytes); edit(arrays), edit_config(dict) first."""
    folder.mkdir(parents=True)
    arrays = init_params(config, seed=0)
    if edit:
        edit(arrays)
    d = to_diffusers_config(config)
    if edit_config:
        d = edit_config(d)
    (folder / "config.json").write_bytes(d if isinstance(d, bytes) else json.dumps(d).encode())
    (folder / ST).write_bytes(st_bytes(arrays))
    return folder


def with_fields(**fields):
    return lambda d: dict(d, **fields)


CONFIG_CASES = {  # id: (edit of the config dict, or the file's bytes; words)
    "not_json": (lambda d: b'{"sample_size": 8', "not a readable JSON file"),
    "not_utf8": (lambda d: b'{"\xff": 1}', "not a readable JSON file"),
    "a_list": (lambda d: b"[1, 2, 3]", "it must hold a JSON object, got list"),
    "a_number": (lambda d: b"42", "must hold a JSON object, got int"),
    "nested_100000_deep": (lambda d: b"[" * 100_000, "not a readable JSON file"),
    "sample_size_a_string": (with_fields(sample_size="8"), "sample_size must be an int in 1..4,096"),
    "sample_size_a_bool": (with_fields(sample_size=True), "sample_size must be an int"),
    "sample_size_1e9_float": (with_fields(sample_size=1e9), "sample_size must be an int in 1..4,096"),
    "sample_size_negative": (with_fields(sample_size=-8), "got -8"),
    "sample_size_over_the_bound": (with_fields(sample_size=8192), "1..4,096"),
    "sample_size_a_list": (with_fields(sample_size=[8, 8]), "sample_size must be one int"),
    "layers_per_block_1e9_float": (with_fields(layers_per_block=1e9), "layers_per_block must be an int in 1..64"),
    "layers_per_block_10**9": (with_fields(layers_per_block=10**9), "layers_per_block must be an int in 1..64"),
    "layers_per_block_0": (with_fields(layers_per_block=0), "layers_per_block"),
    "in_channels_over_the_bound": (with_fields(in_channels=70000), "in_channels must be an int in 1..65,536"),
    "norm_num_groups_a_string": (with_fields(norm_num_groups="4"), "norm_num_groups must be an int"),
    "block_out_channels_a_string": (with_fields(block_out_channels="8,16"), "block_out_channels must be a list"),
    "block_out_channels_negative": (with_fields(block_out_channels=[-8, 16]), "block_out_channels must be a list"),
    "block_out_channels_floats": (with_fields(block_out_channels=[8.0, 16]), "block_out_channels must be a list"),
    "block_out_channels_empty": (with_fields(block_out_channels=[]), "block_out_channels must be a list"),
    "block_out_channels_nested": (with_fields(block_out_channels=[[8], [16]]), "block_out_channels must be a list"),
    "block_out_channels_over_the_bound": (with_fields(block_out_channels=[2**20, 2**21]), "1..65,536"),
    "block_out_channels_14_levels": (with_fields(block_out_channels=[8] * 14), "1..13 ints"),
    "act_fn_unknown": (with_fields(act_fn="gelu"), "act_fn must be one of"),
    "down_block_type_unknown": (with_fields(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]),
                                "down_block_types entry 'CrossAttnDownBlock2D' is not supported"),
    "up_block_types_a_string": (with_fields(up_block_types="UpBlock2D"), "up_block_types must have one entry"),
    "attention_head_dim_0": (with_fields(attention_head_dim=0), "attention_head_dim must be an int"),
    "num_class_embeds_10**7": (with_fields(num_class_embeds=10**7), "num_class_embeds must be an int in 1..1,000,000"),
    "norm_eps_nan": (lambda d: json.dumps(dict(d, norm_eps=float("nan"))).encode(), "norm_eps must be a finite"),
    "freq_shift_infinity": (lambda d: json.dumps(dict(d, freq_shift=float("inf"))).encode(), "freq_shift must be a"),
    "add_attention_a_string": (with_fields(add_attention="yes"), "add_attention must be a bool"),
    "unknown_field": (with_fields(my_option=1), "field 'my_option' is not supported"),
    "class_name_unknown": (with_fields(_class_name="UNet3DConditionModel"), "_class_name must be 'UNet2DModel'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_issue17_bad_config_json_is_one_line(tmp_path, case):
    edit, words = CONFIG_CASES[case]
    folder = diffusers_folder(tmp_path / "unet", edit_config=edit)
    refused(lambda: load_pretrained(folder), folder / "config.json", words)


def test_issue17_config_bounds_are_far_above_real_models():
    assert LIMITS["layers_per_block"] == 64 and LIMITS["sample_size"] == 4096 and LIMITS["in_channels"] == 65536
    for name in ("tiny", "small", "ddpm-cifar10"):
        get_preset(name)  # presets stay inside the bounds
    dataclasses.replace(TINY, sample_size=4096, layers_per_block=64)  # the bounds themselves are allowed


def test_issue17_oversized_or_special_json_files(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * MAX_JSON_BYTES + b"}")
    with pytest.raises(ValueError) as err:
        read_json(big)
    one_line(err, big, "not a readable JSON file: it is larger than 16,777,216 bytes (MAX_JSON_BYTES)")
    (tmp_path / "dir.json").mkdir()
    refused(lambda: read_json(tmp_path / "dir.json"), tmp_path / "dir.json", "not a regular file")
    refused(lambda: read_json(tmp_path / "none.json"), tmp_path / "none.json", "does not exist")
    if os.path.exists("/dev/zero"):  # endless: only a bounded read of a regular file is safe
        refused(lambda: read_json("/dev/zero"), "/dev/zero", "not a regular file")
        refused(lambda: read_safetensors("/dev/zero"), "/dev/zero", "not a regular file")


# --------------------------------------------------------------------------------- weights vs their config
def set_(key, value):
    return lambda arrays: arrays.__setitem__(key, value)


WEIGHT_CASES = {  # id: (edit of the arrays, words)
    "a_weight_missing": (lambda arrays: arrays.pop("conv_in.bias"), "missing keys ['conv_in.bias']"),
    "an_extra_weight": (set_("extra.weight", np.zeros(2, np.float32)), "unexpected keys ['extra.weight']"),
    "a_wrong_shape": (set_("conv_in.bias", np.zeros(5, np.float32)), "'conv_in.bias' has shape (5,), its config "
                                                                     "needs (8,)"),
    "an_int_weight": (set_("conv_in.bias", np.zeros(8, np.int64)), "'conv_in.bias' is not a float array"),
    "a_nan_weight": (set_("conv_in.bias", np.full(8, np.nan, np.float32)), "'conv_in.bias' holds NaN or inf"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_issue17_weights_that_do_not_fit_their_config_are_one_line(tmp_path, case):
    edit, words = WEIGHT_CASES[case]
    folder = diffusers_folder(tmp_path / "unet", edit=edit)
    one_line(pytest.raises(ValueError, load_pretrained, folder), folder, words)


def test_issue17_a_config_that_asks_for_other_weights(tmp_path):
    folder = diffusers_folder(tmp_path / "unet", edit_config=with_fields(layers_per_block=2))
    refused(lambda: load_pretrained(folder), folder / ST, "does not match its config: missing keys")


# --------------------------------------------------------------------------------------------- .npz files
def npy_member(shape, descr="<f4", body=b"") -> bytes:
    """An .npy file whose header declares shape and descr, followed by body (however short)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + body


def npz_of(path: Path, members: dict, compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


def good_npz_members(config=TINY) -> dict:
    out = {}
    for k, a in init_params(config, seed=0).items():
        out[k] = npy_member(a.shape, a.dtype.str, a.tobytes())
    text = np.array(config.to_json())
    out[CONFIG_KEY] = npy_member((), text.dtype.str, text.tobytes())
    return out


def config_member(text: str) -> bytes:
    a = np.array(text)
    return npy_member((), a.dtype.str, a.tobytes())


NPZ_CASES = {  # id: (members or raw bytes, words)
    "not_a_zip": (b"PK\x03\x04 but not really", "not a readable .npz file"),
    "empty_file": (b"", "not a readable .npz file"),
    "member_declares_1_TiB": ({"conv_in.bias": npy_member((2**38,))}, "declares (274877906944,) float32"),
    "no_config": ({"conv_in.bias": npy_member((8,), body=bytes(32))}, "holds no '__config__' entry"),
    "config_not_a_string": ({CONFIG_KEY: npy_member((), body=bytes(4))}, "'__config__' entry is not a string"),
    "config_not_json": ({CONFIG_KEY: config_member("{nope")}, "'__config__': Expecting property name"),
    "config_a_list": ({CONFIG_KEY: config_member("[1, 2]")}, "a UNetConfig is a JSON object"),
    "config_layers_per_block_10**9": ({CONFIG_KEY: config_member(json.dumps(dict(TINY.to_dict(),
                                                                                 layers_per_block=10**9)))},
                                      "layers_per_block must be an int in 1..64"),
    "object_array_payload": (dict(good_npz_members(), **{"conv_in.bias": npy_member((8,), "|O", b"\x80\x04N.")}),
                             "'conv_in.bias' is not a float array"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_issue17_bad_npz_is_one_line(tmp_path, case):
    members, words = NPZ_CASES[case]
    path = tmp_path / "m.npz"
    if isinstance(members, bytes):
        path.write_bytes(members)
    else:
        npz_of(path, members)
    refused(lambda: load_pretrained(path), path, words)


def test_issue17_truncated_and_deflate_bomb_npz(tmp_path):
    path = npz_of(tmp_path / "m.npz", good_npz_members())
    load_pretrained(path)  # the hand-made file is good
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    refused(lambda: load_pretrained(path), path, "not a readable .npz file")
    # a deflated member expands at most ~1032-fold: a member whose zip entry claims 1 GiB from ~1 KB is refused
    bomb = npz_of(tmp_path / "bomb.npz", {"conv_in.bias": npy_member((2**28,), body=bytes(2**20))},
                  compress=zipfile.ZIP_DEFLATED)
    data = bytearray(bomb.read_bytes())
    at = data.rindex(b"PK\x01\x02") + 24  # the central directory's uncompressed size, which zipfile trusts
    data[at:at + 4] = (2**30 + 1000).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))
    with zipfile.ZipFile(bomb) as zf:
        info = zf.infolist()[0]
        assert info.file_size > 2**30 and info.compress_size < 2**20 // 500
    refused(lambda: load_pretrained(bomb), bomb, "declares (268435456,) float32")


# ---------------------------------------------------------------------------------- the CLI: one line, exit 2
def run_cli(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "minidiff", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


CLI_CASES = {  # id: (edit of the folder, the file the line names, words)
    "config_layers_per_block_10**9": (lambda f: (f / "config.json").write_text(json.dumps(dict(
        to_diffusers_config(TINY), layers_per_block=10**9))), "config.json", "layers_per_block"),
    "weights_header_length_2**63": (lambda f: (f / ST).write_bytes(raw(b"{}", length=2**63)), ST, "MAX_HEADER_BYTES"),
    "weights_truncated": (lambda f: (f / ST).write_bytes((f / ST).read_bytes()[:-100]), ST, "truncated"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_issue17_minidiff_sample_on_a_bad_folder_is_one_line_exit_2(tmp_path, case):
    edit, file, words = CLI_CASES[case]
    folder = diffusers_folder(tmp_path / "unet")
    edit(folder)
    p = run_cli("sample", "--checkpoint", str(folder), "--out", str(tmp_path / "out"), "--n", "1", "--steps", "1")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("minidiff sample: error: ") and str(folder / file) in lines[0] and words in lines[0]


# ------------------------------------------- a diffusers pipeline folder: scheduler_config.json and minidiff.json
CLASS_TINY = dataclasses.replace(TINY, num_class_embeds=3)
PIPELINE_CASES = {  # id: (file, its contents, words)
    "scheduler_T_10**12": ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**12},
                           "num_train_timesteps must be in 1..1,000,000 (MAX_TRAIN_TIMESTEPS)"),
    "scheduler_beta_start_a_string": ("scheduler/scheduler_config.json", {"beta_start": "x"},
                                      "beta_start must be a finite number"),
    "scheduler_clip_sample_range_a_string": ("scheduler/scheduler_config.json", {"clip_sample_range": "x"},
                                             "clip_sample_range must be a finite number"),
    "scheduler_trained_betas_a_dict": ("scheduler/scheduler_config.json", {"trained_betas": {"a": 1}},
                                       "trained_betas must be a list of numbers or null"),
    "meta_conditioning_unknown": ("minidiff.json", {"conditioning": "weird"}, "conditioning 'weird' does not fit"),
    "meta_conditioning_text_on_a_class_model": ("minidiff.json", {"conditioning": "text"}, "does not fit"),
    "meta_num_classes_a_string": ("minidiff.json", {"num_classes": "x"}, "num_classes must be an int in 0..3"),
    "meta_num_classes_10**12": ("minidiff.json", {"num_classes": 10**12}, "num_classes must be an int in 0..3"),
    "meta_class_names_an_int": ("minidiff.json", {"class_names": 5}, "class_names must be a list of strings"),
    "meta_tokenizer_vocab_an_int": ("minidiff.json", {"tokenizer": {"vocab": 5, "max_len": 3}}, "tokenizer:"),
    "meta_tokenizer_max_len_10**9": ("minidiff.json", {"tokenizer": {"vocab": ["<pad>", "a"], "max_len": 10**9}},
                                     "max_len must be at most 4,096 (MAX_PROMPT_TOKENS)"),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_issue17_bad_pipeline_files_are_one_line_exit_2(tmp_path, capsys, case):
    from minidiff.cli import main

    file, contents, words = PIPELINE_CASES[case]
    pipe = tmp_path / "pipe"
    diffusers_folder(pipe / "unet", config=CLASS_TINY)
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                        "unet": ["diffusers", "UNet2DModel"],
                                                        "scheduler": ["diffusers", "DDPMScheduler"]}))
    (pipe / "minidiff.json").write_text(json.dumps({"conditioning": "class", "num_classes": 2}))
    (pipe / file).write_text(json.dumps(dict(json.loads((pipe / file).read_text()), **contents)))
    assert main(["sample", "--checkpoint", str(pipe), "--out", str(tmp_path / "out"), "--n", "1", "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(pipe / file) in lines[0] and words in lines[0], lines


# ----------------------------------------------------------------------- random damage: ValueError or success
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_issue17_randomly_damaged_files_give_one_line_or_load(tmp_path, suffix):
    """80 seeded mutations (bytes overwritten, cut, inserted) of a good file: each loads or is one ValueError line;
    nothing else escapes and nothing allocates more than a few times the file."""
    path = tmp_path / f"m{suffix}"
    mini = dataclasses.replace(TINY, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                               up_block_types=("UpBlock2D",), add_attention=False)  # 64 weights: a fast load
    if suffix == ".npz":
        good = npz_of(path, good_npz_members(mini)).read_bytes()
    else:
        good = st_bytes(init_params(mini, seed=0), metadata={"minidiff_config": mini.to_json()})
    rng = np.random.default_rng(17)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(80):
        data, at = bytearray(good), int(rng.integers(len(good)))
        how = rng.integers(3)
        if how == 0:
            data[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif how == 1:
            del data[at:]
        else:
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        tracemalloc.start()
        try:
            load_pretrained(path)
            outcomes["loaded"] += 1
        except ValueError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            outcomes["refused"] += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 8 * len(good) + PEAK_BYTES, peak
    assert outcomes["refused"] > 30, outcomes
