"""Export: our heads as the original's PyTorch checkpoint, in safetensors and in npz, embed as `encode` does.

The reference for the ``torch`` file is the original tool's ``models.create_model`` with its head
modules, written below from the original's published definitions (Linear, GELU, Dropout, LayerNorm,
MultiheadAttention as it composes them) and run in eval mode; the reference for ``safetensors`` and
``npz`` is the heads' formulas in float64 numpy.
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from scipy.special import erf

from tests.conftest import run_cli
from xclip_jax import checkpoint, export
from xclip_jax.config import TrainConfig, build, to_dict
from xclip_jax.spec import RunSpec
from xclip_jax.step import create_train_state

# name: (model section, image dim, text dim). Tiny dims but one 1024-dim input with 8 attention heads.
CASES = {
    "siglip": ({"type": "siglip"}, 16, 24),
    "clip": ({"type": "clip"}, 16, 24),  # hidden_dim null: in_dim // 2 on each side
    "mlp": ({"type": "mlp", "hidden_dim": 12}, 16, 24),
    "attention": ({"type": "attention", "num_heads": 4, "num_layers": 2}, 16, 24),
    "attention-1024": ({"type": "attention", "num_heads": 8, "num_layers": 1}, 1024, 24),
    "linear": ({"type": "linear"}, 16, 24),
    "mlp-hidden-null": ({"type": "mlp"}, 16, 24),  # 8 and 12 hidden: the original's mlp has one width
}
ORIGINAL = ["siglip", "clip", "mlp", "attention", "attention-1024"]

requires_torch = pytest.mark.skipif(
    not os.environ.get("XCLIP_REQUIRE_TORCH") and importlib.util.find_spec("torch") is None,
    reason="torch is not installed (pip install '.[torch]'; CI sets XCLIP_REQUIRE_TORCH)")


def _make_checkpoint(folder, model, image_dim, text_dim):
    """A heads checkpoint as train.py saves one, every parameter moved off its initial value (LayerNorms
    start at 1 and 0, attention biases at 0: a swapped or dropped tensor must show)."""
    cfg = build(TrainConfig, {"data": {"synthetic": {}}, "model": {"output_dim": 8, "dropout": 0.2, **model},
                              "loss": {"type": "sigmoid_infonce", "learnable_temp": True}})
    params = create_train_state(RunSpec(cfg.model, cfg.loss, cfg.training, image_dim, text_dim), seed=0).params
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(tree, [np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32)
                                       for x in leaves])
    meta = {"epoch": 3, "val_r1": 0.25, "image_dim": image_dim, "text_dim": text_dim}
    checkpoint.save_heads(folder / "checkpoint", params, to_dict(cfg), meta, step=3)
    return folder / "checkpoint"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``made(case)``: the case's checkpoint (built once per module), its inputs and our ``encode`` of them."""
    cache = {}

    def get(case):
        if case not in cache:
            model, image_dim, text_dim = CASES[case]
            ckpt = _make_checkpoint(tmp_path_factory.mktemp(case), model, image_dim, text_dim)
            rng = np.random.default_rng(2)
            x = {"image": rng.normal(size=(5, image_dim)).astype(np.float32),
                 "text": rng.normal(size=(5, text_dim)).astype(np.float32)}
            heads = checkpoint.restore(ckpt)
            ours = {"image": np.asarray(heads.encode_images(x["image"])),
                    "text": np.asarray(heads.encode_texts(x["text"]))}
            cache[case] = ckpt, x, ours, heads
        return cache[case]

    return get


# ----------------------------------------------------------------------------- the original's heads, in torch


def original_create_model(config, image_dim, text_dim):
    """The original's ``models.create_model``: its four head modules, built from the config as it builds them."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SigLIPProjectionHead(nn.Module):
        def __init__(self, input_dim, output_dim, dropout=0.0):
            super().__init__()
            self.layer_norm = nn.LayerNorm(input_dim)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.projection = nn.Linear(input_dim, output_dim, bias=False)

        def forward(self, x):
            return F.normalize(self.projection(self.dropout(self.layer_norm(x))), dim=-1)

    class CLIPProjectionHead(nn.Module):
        def __init__(self, input_dim, output_dim, hidden_dim=None, dropout=0.1, final_norm=False):
            super().__init__()
            hidden_dim = input_dim // 2 if hidden_dim is None else hidden_dim
            layers = [nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                      nn.Linear(hidden_dim, output_dim)]
            self.projection = nn.Sequential(*layers, *([nn.LayerNorm(output_dim)] if final_norm else []))

        def forward(self, x):
            return F.normalize(self.projection(x), dim=-1)

    class AttentionProjectionHead(nn.Module):
        def __init__(self, input_dim, output_dim, hidden_dim, num_heads, num_layers, dropout=0.1):
            super().__init__()  # hidden_dim: taken, unused (as in the original)
            self.attention_layers = nn.ModuleList(
                [nn.MultiheadAttention(input_dim, num_heads, dropout=dropout, batch_first=True)
                 for _ in range(num_layers)])
            self.layer_norms = nn.ModuleList([nn.LayerNorm(input_dim) for _ in range(num_layers)])
            self.final_proj = nn.Sequential(nn.Linear(input_dim, output_dim), nn.LayerNorm(output_dim))

        def forward(self, x):
            x = x.unsqueeze(1)  # a sequence of one token
            for attention, norm in zip(self.attention_layers, self.layer_norms):
                x = norm(x + attention(x, x, x)[0])
            return F.normalize(self.final_proj(x.squeeze(1)), dim=-1)

    m = config["model"]

    def head(dim):
        if m["type"] == "siglip":
            return SigLIPProjectionHead(dim, m["output_dim"], m.get("dropout", 0.0))
        if m["type"] == "clip":
            return CLIPProjectionHead(dim, m["output_dim"], m.get("hidden_dim", dim // 2), m.get("dropout", 0.1))
        if m["type"] == "mlp":  # MLPProjectionHead: clip's layers and a final LayerNorm, hidden_dim required
            return CLIPProjectionHead(dim, m["output_dim"], m["hidden_dim"], m["dropout"], final_norm=True)
        return AttentionProjectionHead(dim, m["output_dim"], m["hidden_dim"], m["num_heads"], m["num_layers"],
                                       m["dropout"])

    torch.manual_seed(0)
    return head(image_dim), head(text_dim)


@requires_torch
@pytest.mark.parametrize("case", ORIGINAL)
def test_the_torch_file_loads_into_the_originals_heads_and_embeds_as_encode(case, made, tmp_path):
    import torch

    ckpt, x, ours, heads = made(case)
    path = export.export_heads(ckpt, "torch", tmp_path / "best_model.pt")
    saved = torch.load(path)  # weights_only: plain dicts, numbers and tensors
    assert set(saved) == {"config", "image_head_state", "text_head_state", "epoch", "val_r1", "model", "text_model",
                          "loss_state"}
    assert (saved["epoch"], saved["val_r1"]) == (4, 0.25)  # the original counts epochs from 1
    assert set(saved["config"]["model"]) == set(export.MODEL_KEYS)
    assert {"loss", "training"} <= set(saved["config"]) and saved["config"]["loss"]["learnable_scale"] is True
    loss = heads.params["loss"]
    assert saved["loss_state"]["logit_scale"].item() == pytest.approx(float(loss["log_scale"]))
    assert saved["loss_state"]["logit_bias"].item() == pytest.approx(float(loss["bias"]))
    for alias, state in (("model", "image_head_state"), ("text_model", "text_head_state")):  # a trial's names
        assert saved[alias].keys() == saved[state].keys()
        assert all(torch.equal(saved[alias][k], v) for k, v in saved[state].items())
    modules = dict(zip(("image", "text"), original_create_model(saved["config"], heads.image_dim, heads.text_dim)))
    for side, state in (("image", "image_head_state"), ("text", "text_head_state")):
        module = modules[side]
        module.load_state_dict(saved[state])  # strict: every name and shape the original's
        module.eval()
        with torch.no_grad():
            theirs = module(torch.from_numpy(x[side])).numpy()
        np.testing.assert_allclose(theirs, ours[side], atol=1e-5, err_msg=f"{case} {side}")
        if case.startswith("attention"):  # the zero query/key blocks stand for any: one token attends to itself
            layer = module.attention_layers[0]
            with torch.no_grad():
                layer.in_proj_weight[: 2 * layer.embed_dim].normal_()
                layer.in_proj_bias[: 2 * layer.embed_dim].normal_()
                np.testing.assert_allclose(module(torch.from_numpy(x[side])).numpy(), ours[side], atol=1e-5)


# ----------------------------------------------------------------------------- safetensors and npz, in numpy


def _layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def numpy_head(head_type, tensors, prefix, x):
    """A head's forward pass in float64 from the flat tensors (eval mode: dropout is the identity)."""

    def t(name):
        return tensors[f"{prefix}.{name}"].astype(np.float64)

    def linear(x, name, bias=True):
        return x @ t(f"{name}.weight").T + (t(f"{name}.bias") if bias else 0)

    def norm(x, name):
        return _layer_norm(x, t(f"{name}.weight"), t(f"{name}.bias"))

    x = x.astype(np.float64)
    if head_type == "siglip":
        z = linear(norm(x, "layer_norm"), "projection", bias=False)
    elif head_type in ("clip", "mlp"):
        z = linear(_gelu(linear(x, "projection.0")), "projection.3")
        z = norm(z, "projection.4") if head_type == "mlp" else z
    elif head_type == "attention":
        i, d = 0, x.shape[-1]
        while f"{prefix}.attention_layers.{i}.in_proj_weight" in tensors:
            # one token: the attention weights are 1, the block is out_proj of the value projection
            block = f"attention_layers.{i}"
            value = x @ t(f"{block}.in_proj_weight")[2 * d:].T + t(f"{block}.in_proj_bias")[2 * d:]
            x = norm(x + linear(value, f"{block}.out_proj"), f"layer_norms.{i}")
            i += 1
        z = norm(linear(x, "final_proj.0"), "final_proj.1")
    else:
        z = linear(x, "projection")
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _read(fmt, path):
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), "np") as f:
            return load_file(str(path)), json.loads(f.metadata()["header"])
    with np.load(path) as f:
        tensors = {name: f[name] for name in f.files}
    return tensors, json.loads(str(tensors.pop("header")))


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "mlp-hidden-null"])
def test_safetensors_and_npz_reload_into_numpy_and_embed_as_encode(case, fmt, made, tmp_path):
    ckpt, x, ours, heads = made(case)
    tensors, header = _read(fmt, export.export_heads(ckpt, fmt, tmp_path / f"heads.{fmt}"))
    assert (header["epoch"], header["val_r1"], header["image_dim"], header["text_dim"]) == (
        4, 0.25, heads.image_dim, heads.text_dim)
    assert header["config"]["model"]["type"] == heads.config.model.type
    assert build(TrainConfig, header["xclip_jax_config"]) == heads.config
    assert float(tensors["loss_state.logit_scale"]) == pytest.approx(float(heads.params["loss"]["log_scale"]))
    assert all(a.dtype == np.float32 for a in tensors.values())
    for side in ("image", "text"):
        theirs = numpy_head(heads.config.model.type, tensors, f"{side}_head_state", x[side])
        np.testing.assert_allclose(theirs, ours[side], atol=1e-5, err_msg=f"{case} {side}")


# ----------------------------------------------------------------------------- refusals: one line, exit 2


@pytest.mark.parametrize("case", ["linear", "mlp-hidden-null"])
def test_a_head_the_original_cannot_build_is_refused_for_torch(case, made, capsys, tmp_path):
    ckpt = made(case)[0]
    err = run_cli(export.main, [str(ckpt), "--out", str(tmp_path / "x.pt")], capsys)
    assert "--format safetensors" in err and not (tmp_path / "x.pt").exists()


def test_without_torch_one_line_names_the_extra(made, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    ckpt = made("siglip")[0]
    err = run_cli(export.main, [str(ckpt)], capsys)
    assert "pip install 'torch>=2.1'" in err and "whl/cpu" in err and not list(ckpt.glob("best_model.pt*"))


def test_bad_input_is_one_line_exit_2(made, capsys, tmp_path):
    ckpt = made("siglip")[0]
    assert "not found" in run_cli(export.main, [str(tmp_path / "nothing")], capsys)
    assert "choose one of torch, safetensors, npz" in run_cli(export.main, [str(ckpt), "--format", "onnx"], capsys)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    for f in (corrupt / "3" / "params").rglob("*"):
        if f.is_file():
            f.write_text("garbage")
    assert "not a readable heads checkpoint" in run_cli(export.main, [str(corrupt), "--format", "npz"], capsys)
    # the default file, inside the checkpoint's folder; a second export refuses to overwrite it without --force
    assert export.main([str(ckpt), "--format", "npz"]) == 0
    first = (ckpt / "best_model.npz").stat().st_mtime_ns
    assert "--force" in run_cli(export.main, [str(ckpt), "--format", "npz"], capsys)
    assert (ckpt / "best_model.npz").stat().st_mtime_ns == first
    assert export.main([str(ckpt / "3"), "--format", "npz", "--force"]) == 0  # a step folder: the same file
    assert sorted(p.name for p in ckpt.iterdir() if p.is_file()) == ["best_model.npz"]
