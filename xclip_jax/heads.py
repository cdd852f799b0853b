"""The four projection heads (SPEC §2) as Flax modules, and the factory that builds a pair from a
``HeadSpec`` (which, with the allowed head types, lives in ``xclip_jax.spec``).

Initialisation follows PyTorch's defaults (``nn.Linear``: weights and bias uniform in
±1/sqrt(fan_in); ``nn.MultiheadAttention``: Xavier-uniform input projection, zero biases) so that a
head trained here starts where the original's did. GELU is the exact (erf) form and LayerNorm's
eps is 1e-5, as in PyTorch.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xclip_jax.spec import HEAD_TYPES, HeadSpec

LN_EPS = 1e-5


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, fan_in: int, *, use_bias: bool = True, dtype: Any = jnp.float32,
                 name: str | None = None, kernel_init=None, bias_init=None) -> nn.Dense:
    """A Dense layer initialised as PyTorch's ``nn.Linear`` unless told otherwise."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init or _uniform(bound),
        bias_init=bias_init or _uniform(bound),
        name=name,
    )


def dropout(module: nn.Module, x, rate, train: bool, broadcast_dims=()):
    """Inverted dropout whose ``rate`` may be a traced scalar (unlike ``nn.Dropout``'s attribute)."""
    if not train or (isinstance(rate, (int, float)) and rate == 0):
        return x
    shape = tuple(1 if i in broadcast_dims else n for i, n in enumerate(x.shape))
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _layer_norm(name=None):
    # Two-pass statistics, as PyTorch: E[x²] − E[x]² cancels catastrophically on rows far from zero.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _gelu(x):
    return nn.gelu(x, approximate=False)


class SiglipHead(nn.Module):
    """LayerNorm → Dropout → Linear(in→out, no bias, N(0, in^-1/2)) → L2."""

    spec: HeadSpec
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, *, train: bool = False, dropout_rate=None):
        in_dim = x.shape[-1]
        rate = self.spec.dropout if dropout_rate is None else dropout_rate
        x = _layer_norm()(x)
        x = dropout(self, x, rate, train)
        x = torch_linear(self.spec.output_dim, in_dim, use_bias=False, dtype=jnp.dtype(self.dtype),
                         kernel_init=nn.initializers.normal(stddev=in_dim ** -0.5))(x)
        return l2_normalize(x)


class ClipHead(nn.Module):
    """Linear(in→hidden) → GELU → Dropout → Linear(hidden→out) [→ LayerNorm for mlp] → L2."""

    spec: HeadSpec
    dtype: str = "float32"
    final_norm: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool = False, dropout_rate=None):
        in_dim = x.shape[-1]
        hidden = self.spec.hidden_dim or in_dim // 2
        dtype = jnp.dtype(self.dtype)
        rate = self.spec.dropout if dropout_rate is None else dropout_rate
        x = torch_linear(hidden, in_dim, dtype=dtype)(x)
        x = _gelu(x)
        x = dropout(self, x, rate, train)
        x = torch_linear(self.spec.output_dim, hidden, dtype=dtype)(x)
        if self.final_norm:
            x = _layer_norm()(x)
        return l2_normalize(x)


class AttentionBlock(nn.Module):
    """``x ← LayerNorm(x + MHA(x, x, x))`` for a sequence of length one.

    With one token the attention softmax is identically 1, so MHA reduces to
    ``out_proj(dropout_per_head(v_proj(x)))``: the query and key projections change neither the
    output nor any gradient, and are not computed (half of the block's four E×E products saved). Dropout on
    the attention weights becomes one keep/drop decision per example and head, scaled by
    1/(1-p), which is exactly what PyTorch's dropout on the [B, H, 1, 1] weights does.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, dropout_rate=0.0):
        dim = x.shape[-1]
        # PyTorch: in_proj_weight [3E, E] Xavier-uniform, biases 0; out_proj Linear init, bias 0.
        xavier = _uniform(math.sqrt(6.0 / (dim + 3 * dim)))
        v = torch_linear(dim, dim, dtype=self.dtype, kernel_init=xavier, bias_init=nn.initializers.zeros,
                         name="v_proj")(x)
        v_BxHxK = v.reshape(v.shape[:-1] + (self.num_heads, dim // self.num_heads))
        v_BxHxK = dropout(self, v_BxHxK, dropout_rate, train, broadcast_dims=(v_BxHxK.ndim - 1,))
        attn = torch_linear(dim, dim, dtype=self.dtype, bias_init=nn.initializers.zeros,
                            name="out_proj")(v_BxHxK.reshape(v.shape))
        return _layer_norm()(x + attn)


class AttentionHead(nn.Module):
    """``num_layers`` × AttentionBlock over the input dims, then Linear(in→out) → LayerNorm → L2."""

    spec: HeadSpec
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, *, train: bool = False, dropout_rate=None):
        in_dim = x.shape[-1]
        dtype = jnp.dtype(self.dtype)
        rate = self.spec.dropout if dropout_rate is None else dropout_rate
        for _ in range(self.spec.num_layers):
            x = AttentionBlock(self.spec.num_heads, dtype)(x, train=train, dropout_rate=rate)
        x = torch_linear(self.spec.output_dim, in_dim, dtype=dtype)(x)
        x = _layer_norm()(x)
        return l2_normalize(x)


class LinearHead(nn.Module):
    """Linear(in→out) → L2: one projection per modality, no hidden layer (what ``init: cca`` can start
    at the CCA solution)."""

    spec: HeadSpec
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, *, train: bool = False, dropout_rate=None):
        rate = self.spec.dropout if dropout_rate is None else dropout_rate
        x = dropout(self, x, rate, train)
        x = torch_linear(self.spec.output_dim, x.shape[-1], dtype=jnp.dtype(self.dtype))(x)
        return l2_normalize(x)


def make_head(spec: HeadSpec, in_dim: int, dtype: str = "float32") -> nn.Module:
    """Build one head for inputs of ``in_dim`` dims, its matmuls in ``dtype``; raises ValueError on an
    impossible spec."""
    if spec.type not in HEAD_TYPES:
        raise ValueError(f"unknown head type {spec.type!r}; choose one of {', '.join(HEAD_TYPES)}")
    if spec.type == "attention" and in_dim % spec.num_heads:
        raise ValueError(
            f"attention head: input dim {in_dim} is not divisible by num_heads={spec.num_heads}; "
            "choose num_heads that divides both input dims")
    if spec.type == "siglip":
        return SiglipHead(spec, dtype)
    if spec.type == "clip":
        return ClipHead(spec, dtype)
    if spec.type == "mlp":
        return ClipHead(spec, dtype, final_norm=True)
    if spec.type == "linear":
        return LinearHead(spec, dtype)
    return AttentionHead(spec, dtype)


def make_heads(spec: HeadSpec, image_dim: int, text_dim: int, dtype: str = "float32") -> tuple[nn.Module, nn.Module]:
    """The image head and the text head: same hyperparameters, each for its own input dim."""
    return make_head(spec, image_dim, dtype), make_head(spec, text_dim, dtype)


def init_head_params(spec: HeadSpec, image_dim: int, text_dim: int, key: jax.Array) -> dict:
    """Fresh parameters ``{"image": …, "text": …}`` for both heads (the dtype changes no parameter)."""
    image_head, text_head = make_heads(spec, image_dim, text_dim)
    k_img, k_txt = jax.random.split(key)
    return {
        "image": image_head.init(k_img, jnp.zeros((1, image_dim), jnp.float32))["params"],
        "text": text_head.init(k_txt, jnp.zeros((1, text_dim), jnp.float32))["params"],
    }
