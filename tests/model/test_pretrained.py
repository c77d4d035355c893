"""Saving and loading U-Net weights with their config: .npz, .safetensors, diffusers folders;
atomic writes; refusals that name the field."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from minidiff.model.pretrained import load_pretrained, save_pretrained
from minidiff.model.unet import init_params, param_shapes, unet_forward
from minidiff.model.config import get_preset

TINY = get_preset("tiny")
CROSS = dataclasses.replace(TINY, cross_attention_dim=6, context_vocab_size=7, num_class_embeds=3)


def _same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("config, dtype", [(TINY, np.float32), (CROSS, np.float64)])
def test_roundtrip(tmp_path, suffix, config, dtype):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    params = init_params(config, seed=4, dtype=dtype)
    path = save_pretrained(params, config, tmp_path / f"m{suffix}")
    loaded, loaded_config = load_pretrained(path)
    assert loaded_config == config
    _same(loaded, params)
    as64, _ = load_pretrained(path, dtype=np.float64)
    assert all(v.dtype == np.float64 for v in as64.values())


def test_npz_needs_no_pickle(tmp_path):
    path = save_pretrained(init_params(TINY), TINY, tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as f:  # raises if anything had been pickled
        config = json.loads(str(f["__config__"]))
        assert config["block_out_channels"] == list(TINY.block_out_channels)
        assert set(f.files) == set(param_shapes(TINY)) | {"__config__"}


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    save_pretrained(init_params(TINY, seed=1), TINY, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="params"):  # refused before anything is written
        save_pretrained({"conv_in.weight": np.zeros(3)}, TINY, path)

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(init_params(TINY, seed=2), TINY, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary file left behind


def test_missing_safetensors_gives_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install 'minidiff\[safetensors\]'"):
        save_pretrained(init_params(TINY), TINY, tmp_path / "m.safetensors")


def test_mismatched_files_are_refused(tmp_path):
    params = init_params(TINY)
    bad = dict(params, **{"conv_in.bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="conv_in.bias"):
        save_pretrained(bad, TINY, tmp_path / "m.npz")
    np.savez(tmp_path / "plain.npz", **params)  # no config inside
    with pytest.raises(ValueError, match="__config__"):
        load_pretrained(tmp_path / "plain.npz")
    arrays = dict(params)
    arrays["__config__"] = np.array(dataclasses.replace(TINY, layers_per_block=2).to_json())
    np.savez(tmp_path / "wrong.npz", **arrays)  # config and weights disagree
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained(tmp_path / "wrong.npz")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing.npz")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="npz"):
        load_pretrained(tmp_path / "weights.pt")


def test_diffusers_folder_roundtrip_and_refusals(tmp_path):
    pytest.importorskip("safetensors")
    params = init_params(TINY, seed=2)
    folder = save_pretrained(params, TINY, tmp_path / "unet")
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded, config = load_pretrained(folder)
    assert config == TINY
    _same(loaded, params)
    with pytest.raises(ValueError, match="cross_attention_dim"):  # UNet2DModel has no such blocks
        save_pretrained(init_params(CROSS), CROSS, tmp_path / "cross")
    d = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(d, resnet_time_scale_shift="scale_shift")))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(d, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(ValueError, match="down_block_types"):
        load_pretrained(folder)


def test_diffusers_save_pretrained_folder_loads_and_runs_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = dataclasses.replace(TINY, num_class_embeds=4, downsample_padding=0)
    torch.manual_seed(0)
    kwargs = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("cross_attention_dim",
                                                                                 "context_vocab_size")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    model.save_pretrained(tmp_path / "hf")  # config.json + diffusion_pytorch_model.safetensors
    params, loaded_config = load_pretrained(tmp_path / "hf")
    assert loaded_config == config
    state = model.state_dict()
    assert list(params) == list(state)
    for k in params:
        np.testing.assert_array_equal(params[k], state[k].numpy())
    # and back: diffusers reads what minidiff writes
    save_pretrained(params, config, tmp_path / "mine")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "mine").eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    t, y = np.array([3, 500]), np.array([1, 3])
    with torch.no_grad():
        ref = again(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    eps, _ = unet_forward(params, config, x, t, class_labels=y)
    np.testing.assert_allclose(eps, ref, rtol=0, atol=1e-4)  # float32, and diffusers' float32 time embedding
