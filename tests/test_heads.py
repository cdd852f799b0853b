"""Each head's forward pass against a float64 numpy reference given the same weights (SPEC §2)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax.heads import HeadSpec, make_head, make_heads

IN, OUT, HID = 24, 16, 20


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def ref_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def ref_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def ref_l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ref_dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def ref_head(kind, p, x, num_heads=4, num_layers=2):
    if kind == "linear":
        return ref_l2(ref_dense(x, p["Dense_0"]))
    if kind == "siglip":
        return ref_l2(ref_dense(ref_ln(x, p["LayerNorm_0"]), p["Dense_0"]))
    if kind in ("clip", "mlp"):
        h = ref_dense(ref_gelu(ref_dense(x, p["Dense_0"])), p["Dense_1"])
        return ref_l2(ref_ln(h, p["LayerNorm_0"]) if kind == "mlp" else h)
    for i in range(num_layers):
        blk = p[f"AttentionBlock_{i}"]
        rng = np.random.default_rng(i)
        x = ref_ln(x + ref_mha_one_token(x, blk, num_heads, rng), blk["LayerNorm_0"])
    return ref_l2(ref_ln(ref_dense(x, p["Dense_0"]), p["LayerNorm_0"]))


def ref_mha_one_token(x, blk, num_heads, rng):
    """Full multi-head attention over a length-1 sequence, with arbitrary query/key weights."""
    b, d = x.shape
    k = d // num_heads
    wq, wk = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    q = (x @ wq).reshape(b, num_heads, 1, k)
    key = (x @ wk).reshape(b, num_heads, 1, k)
    v = ref_dense(x, blk["v_proj"]).reshape(b, num_heads, 1, k)
    scores = q @ key.transpose(0, 1, 3, 2) / math.sqrt(k)  # [b, h, 1, 1]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return ref_dense((weights @ v).reshape(b, d), blk["out_proj"])


@pytest.mark.parametrize("kind", ["siglip", "clip", "mlp", "attention", "linear"])
def test_head_forward_matches_reference(kind):
    spec = HeadSpec(kind, OUT, HID, dropout=0.3, num_heads=4, num_layers=2)
    head = make_head(spec, IN)
    x = np.random.default_rng(0).normal(size=(7, IN))
    params = head.init(jax.random.PRNGKey(1), jnp.zeros((1, IN)))["params"]
    # Perturb LayerNorm params away from their (1, 0) init so the test sees them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(path))), a.shape)
        if "LayerNorm" in str(path) else a, params)
    got = head.apply({"params": params}, jnp.asarray(x, jnp.float32), train=False)
    chex.assert_shape(got, (7, OUT))
    chex.assert_type(got, jnp.float32)
    want = ref_head(kind, _np(params), x)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=1), 1.0, atol=1e-5)


def test_hidden_defaults_to_half_input():
    params = make_head(HeadSpec("clip", OUT, None), IN).init(jax.random.PRNGKey(0), jnp.zeros((1, IN)))["params"]
    assert params["Dense_0"]["kernel"].shape == (IN, IN // 2)


def test_torch_style_init_bounds():
    p = make_head(HeadSpec("clip", OUT, HID), IN).init(jax.random.PRNGKey(0), jnp.zeros((1, IN)))["params"]
    assert np.abs(p["Dense_0"]["kernel"]).max() <= 1 / math.sqrt(IN)
    assert np.abs(p["Dense_1"]["bias"]).max() <= 1 / math.sqrt(HID)
    s = make_head(HeadSpec("siglip", 256), 512).init(jax.random.PRNGKey(0), jnp.zeros((1, 512)))["params"]
    assert "bias" not in s["Dense_0"]
    assert np.std(s["Dense_0"]["kernel"]) == pytest.approx(512 ** -0.5, rel=0.05)


def test_dropout_is_active_only_in_training():
    spec = HeadSpec("clip", OUT, HID, dropout=0.5)
    head = make_head(spec, IN)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, IN)), jnp.float32)
    params = head.init(jax.random.PRNGKey(0), x)["params"]
    a = head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    c = head.apply({"params": params}, x, train=False)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, head.apply({"params": params}, x, train=False))


def test_attention_dropout_is_per_head():
    """Dropout on the [B, H, 1, 1] attention weights zeroes whole heads of v, per example."""
    spec = HeadSpec("attention", OUT, dropout=0.5, num_heads=4, num_layers=1)
    head = make_head(spec, IN)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, IN)), jnp.float32)
    params = head.init(jax.random.PRNGKey(0), x)["params"]
    _, inter = head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)},
                          capture_intermediates=lambda mdl, _: mdl.name == "out_proj", mutable=["intermediates"])
    blk = params["AttentionBlock_0"]
    v = (np.asarray(x) @ np.asarray(blk["v_proj"]["kernel"]) + np.asarray(blk["v_proj"]["bias"])).reshape(64, 4, -1)
    out = np.asarray(inter["intermediates"]["AttentionBlock_0"]["out_proj"]["__call__"][0])
    dropped_in = np.linalg.solve(np.asarray(blk["out_proj"]["kernel"]).T,
                                 (out - np.asarray(blk["out_proj"]["bias"])).T).T.reshape(64, 4, -1)
    ratio = dropped_in / v
    per_head = ratio.reshape(64 * 4, -1)
    # every head of every example is either all 0 or all 2 (= 1/(1-p)); the solve above amplifies
    # float error where v is tiny, so judge each head by its median and nearly all of its entries
    med = np.round(np.median(per_head, axis=1, keepdims=True))
    assert set(med.ravel().astype(int)) == {0, 2}
    assert np.mean(np.abs(per_head - med) < 1e-2) > 0.99


def test_pair_factory_and_errors():
    img, txt = make_heads(HeadSpec("mlp", OUT, HID), 12, 20)
    assert img.init(jax.random.PRNGKey(0), jnp.zeros((1, 12)))["params"]["Dense_0"]["kernel"].shape == (12, HID)
    assert txt.init(jax.random.PRNGKey(0), jnp.zeros((1, 20)))["params"]["Dense_0"]["kernel"].shape == (20, HID)
    with pytest.raises(ValueError, match="unknown head type 'bert'"):
        make_head(HeadSpec("bert"), 8)
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        make_head(HeadSpec("attention", num_heads=5), 12)


def test_bfloat16_compute_stays_close():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, IN)), jnp.float32)
    for kind in ("siglip", "clip", "mlp", "attention"):
        f32 = make_head(HeadSpec(kind, OUT, HID, num_heads=4), IN)
        bf16 = make_head(HeadSpec(kind, OUT, HID, num_heads=4), IN, "bfloat16")
        params = f32.init(jax.random.PRNGKey(0), x)["params"]
        a = f32.apply({"params": params}, x)
        b = bf16.apply({"params": params}, x)
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=5e-2)


@pytest.mark.parametrize("kind", ["siglip", "attention"])
def test_layer_norm_is_two_pass_on_rows_far_from_zero(kind):
    """Rows with mean 300 and std 0.05 at D = 768: E[x²] − E[x]² in float32 loses the variance
    entirely (an error of 57 in the normalised values), the two-pass formula PyTorch uses does not."""
    d = 768
    rng = np.random.default_rng(0)
    x = (300.0 + 0.05 * rng.standard_normal((8, d))).astype(np.float32)
    spec = HeadSpec(kind, OUT, dropout=0.0, num_heads=4, num_layers=1)
    head = make_head(spec, d)
    params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, d)))["params"]
    # LayerNorm biases away from 0 (as after training): the outputs then see the normalised values'
    # scale, which the final L2 normalisation hides at the initial zero bias
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 if "LayerNorm" in jax.tree_util.keystr(path) and path[-1].key == "bias" else p, params)
    got = np.asarray(head.apply({"params": params}, jnp.asarray(x)))
    want = ref_head(kind, _np(params), x.astype(np.float64), num_heads=4, num_layers=1)
    np.testing.assert_allclose(got, want, atol=2e-3)
