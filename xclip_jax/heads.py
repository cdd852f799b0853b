"""The projection heads as Flax modules, one per modality, each ending in L2 normalisation
(``x / max(‖x‖, 1e-12)``): ``siglip`` (LayerNorm → Dropout → Linear without bias), ``clip`` (Linear →
GELU → Dropout → Linear), ``mlp`` (``clip`` then LayerNorm), ``attention`` (self-attention blocks, then
Linear → LayerNorm) and ``linear`` (Dropout → Linear); each class below gives its layers. Each is
built at static (padded) widths and called with a member's real widths as data.

A head's static sizes (output width, hidden width, attention layers) are the program's; the real
ones of the trial it computes (``Widths``) are arrays, so trials of one head type with other widths
share one compiled program. A padded unit is exactly zero and stays so: it is initialised to zero,
its output is masked, so its gradient is zero too (and AdamW keeps a zero weight at zero); the
real units compute what the same head built at its real widths computes.

Initialisation follows PyTorch's defaults (``nn.Linear``: weights and bias uniform in
±1/sqrt(fan_in) of the *real* fan-in; ``nn.MultiheadAttention``: Xavier-uniform input projection,
zero biases), drawn so that a weight's value does not depend on the padding around it: a kernel is
drawn column by column (each output unit's key folded from the layer's), so its real block is what
the unpadded head draws. Dropout on a hidden layer draws [H, B] and transposes it: the first h
rows of that draw are the [h, B] draw, so a padded member drops what its unpadded run drops. GELU is
the exact (erf) form and LayerNorm's eps is 1e-5, both as PyTorch;
LayerNorm takes two-pass statistics (over the real units only, where the width is padded).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xclip_jax.spec import HEAD_TYPES, HeadSpec

LN_EPS = 1e-5


class Widths(NamedTuple):
    """One member's real sizes, as data (int arrays or ints): its output width, this side's hidden
    width (clip, mlp), its attention layers and attention heads."""

    output_dim: Any
    hidden_dim: Any
    num_layers: Any
    num_heads: Any


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _units(n: int, real) -> jax.Array:
    """The mask of the first ``real`` of ``n`` units."""
    return jnp.arange(n) < real


def _draw(sample, rows=None, cols=None, live=True):
    """An initializer: ``sample(key, shape)`` for a bias, or for a kernel [in, out] column by column
    (column j from ``fold_in(key, j)``: its values do not depend on how many columns or rows the
    array has), zero past ``rows`` inputs and ``cols`` outputs (the real widths; None: all), and
    zero everywhere in a layer that is not ``live``."""

    def init(key, shape, dtype=jnp.float32):
        if len(shape) == 1:
            x = sample(key, shape)
            keep = True if cols is None else _units(shape[0], cols)
        else:
            n_in, n_out = shape
            x = jax.vmap(lambda j: sample(jax.random.fold_in(key, j), (n_in,)))(jnp.arange(n_out)).T
            keep = ((True if rows is None else _units(n_in, rows)[:, None])
                    & (True if cols is None else _units(n_out, cols)[None, :]))
        return jnp.where(jnp.logical_and(keep, live), x, 0.0).astype(dtype)

    return init


def _uniform(bound):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * bound


def _normal(stddev):
    return lambda key, shape: jax.random.normal(key, shape, jnp.float32) * stddev


def _zeros(key, shape):
    return jnp.zeros(shape, jnp.float32)


def torch_linear(features: int, *, fan_in, rows=None, cols=None, live=True, use_bias: bool = True,
                 dtype: Any = jnp.float32, name: str | None = None, kernel=None, bias=None) -> nn.Dense:
    """A Dense layer of ``features`` (static) outputs initialised as PyTorch's ``nn.Linear`` of
    ``fan_in`` real inputs (unless ``kernel``/``bias`` samplers say otherwise), zero past ``rows``
    real inputs and ``cols`` real outputs (and all zero in a layer that is not ``live``)."""
    bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=_draw(kernel or _uniform(bound), rows, cols, live),
                    bias_init=_draw(bias or _uniform(bound), None, cols, live))


def dropout(module: nn.Module, x, rate, train: bool, keep_shape=None):
    """Inverted dropout whose ``rate`` may be a traced scalar (unlike ``nn.Dropout``'s attribute).

    ``keep_shape(key, keep) -> [B, D] bool`` draws the mask (default: one draw per entry of ``x``).
    A traced rate draws under a ``cond``: a member at rate 0 draws nothing (a bundle of one; in a
    vmapped bundle the ``cond`` becomes a select and every member draws)."""
    if not train or (isinstance(rate, (int, float)) and rate == 0):
        return x
    key = module.make_rng("dropout")

    def drop(x):
        keep = 1.0 - rate
        mask = keep_shape(key, keep) if keep_shape else jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)

    if isinstance(rate, (int, float)):
        return drop(x)
    return jax.lax.cond(rate > 0, drop, lambda x: x, x)


def _per_unit(shape):
    """One decision per entry of a [B, H] hidden layer, drawn as [H, B] and transposed: the first h
    units' decisions are the same whatever H a program pads to (threefry counts over the flat index,
    so an [H, B] draw's first h rows are the [h, B] draw), and a padded member drops what its
    unpadded run drops."""
    b, d = shape

    def keep_shape(key, keep):
        return jax.random.bernoulli(key, keep, (d, b)).T

    return keep_shape


def _per_head(shape, num_heads, max_heads):
    """A dropout mask over [B, D] with one decision per example and attention head: the dims of head
    h (D / num_heads of them, ``num_heads`` data) all take head h's decision. Head h's decisions are
    drawn from ``fold_in(key, h)``, for ``max_heads`` (static, >= num_heads) heads: B x max_heads
    draws, not B x D, and the same decisions whatever ``max_heads`` a program has."""
    b, d = shape
    head_of = jnp.arange(d) // (d // num_heads)

    def keep_shape(key, keep):
        draws = jax.vmap(lambda h: jax.random.bernoulli(jax.random.fold_in(key, h), keep, (b,)))(jnp.arange(max_heads))
        return draws.T[:, head_of]

    return keep_shape


class MaskedLayerNorm(nn.Module):
    """LayerNorm (two-pass, eps 1e-5) over the first ``count`` of the last axis' units; the rest of
    the output is zero, and so are their scale and bias."""

    @nn.compact
    def __call__(self, x, count):
        n = x.shape[-1]
        real = _units(n, count)
        scale = self.param("scale", lambda key, shape: jnp.where(real, 1.0, 0.0).astype(jnp.float32), (n,))
        bias = self.param("bias", nn.initializers.zeros_init(), (n,), jnp.float32)
        x = x.astype(jnp.float32)
        count = jnp.asarray(count, jnp.float32)
        mean = jnp.sum(jnp.where(real, x, 0.0), axis=-1, keepdims=True) / count
        centred = jnp.where(real, x - mean, 0.0)
        var = jnp.sum(centred * centred, axis=-1, keepdims=True) / count
        return jnp.where(real, centred * jax.lax.rsqrt(var + LN_EPS) * scale + bias, 0.0)


def _layer_norm(live=True):
    # Two-pass statistics, as PyTorch: E[x²] − E[x]² cancels catastrophically on rows far from zero.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                        scale_init=lambda key, shape, dtype: jnp.where(live, jnp.ones(shape, dtype), 0.0))


def _gelu(x):
    return nn.gelu(x, approximate=False)


class Head(nn.Module):
    """What every head has: its static widths (the program's) and the defaults of a head built at
    its real widths (``make_head``), which a call's ``widths`` and ``dropout_rate`` replace. Every
    head class takes these fields (``ClipHead(output_dim=256, hidden_dim=512, dropout=0.1)``).
    """

    output_dim: int
    """The width of the shared embedding space (the output)."""
    hidden_dim: int = 0
    """The hidden layer's width (``clip`` and ``mlp``; 0 where a head has none)."""
    num_layers: int = 1
    """Attention blocks (``attention`` only)."""
    num_heads: int = 1
    """Attention heads (``attention`` only); in a program, the most heads a member has: attention
    dropout draws that many."""
    dropout: float = 0.0
    """The dropout rate where a call gives no ``dropout_rate``."""
    dtype: str = "float32"
    """The computation's dtype (``float32`` or ``bfloat16``); parameters stay float32."""

    def _real(self, widths: Widths | None) -> Widths:
        return widths if widths is not None else Widths(self.output_dim, self.hidden_dim, self.num_layers,
                                                        self.num_heads)

    def _rate(self, dropout_rate):
        return self.dropout if dropout_rate is None else dropout_rate

    def _out(self, x, fan_in, rows=None, w=None, **kw):
        """The output projection to the real output width (zero past it, masked)."""
        z = torch_linear(self.output_dim, fan_in=fan_in, rows=rows, cols=w.output_dim, dtype=jnp.dtype(self.dtype),
                         **kw)(x)
        return jnp.where(_units(self.output_dim, w.output_dim), z, 0.0)


class SiglipHead(Head):
    """LayerNorm → Dropout → Linear(in→out, no bias, N(0, in^-1/2)) → L2."""

    @nn.compact
    def __call__(self, x, widths: Widths | None = None, *, train: bool = False, dropout_rate=None):
        w, in_dim = self._real(widths), x.shape[-1]
        x = dropout(self, _layer_norm()(x), self._rate(dropout_rate), train)
        return l2_normalize(self._out(x, in_dim, w=w, use_bias=False, kernel=_normal(in_dim ** -0.5)))


class ClipHead(Head):
    """Linear(in→hidden) → GELU → Dropout → Linear(hidden→out) [→ LayerNorm for mlp] → L2."""

    final_norm: bool = False
    """The LayerNorm after the output projection (the ``mlp`` head)."""

    @nn.compact
    def __call__(self, x, widths: Widths | None = None, *, train: bool = False, dropout_rate=None):
        w, in_dim = self._real(widths), x.shape[-1]
        h = torch_linear(self.hidden_dim, fan_in=in_dim, cols=w.hidden_dim, dtype=jnp.dtype(self.dtype))(x)
        h = jnp.where(_units(self.hidden_dim, w.hidden_dim), _gelu(h), 0.0)
        h = dropout(self, h, self._rate(dropout_rate), train, _per_unit(h.shape))
        z = self._out(h, w.hidden_dim, rows=w.hidden_dim, w=w)
        if self.final_norm:
            z = MaskedLayerNorm(name="LayerNorm_0")(z, w.output_dim)
        return l2_normalize(z)


class AttentionBlock(nn.Module):
    """``x ← LayerNorm(x + MHA(x, x, x))`` for a sequence of length one.

    With one token the attention softmax is identically 1, so MHA reduces to
    ``out_proj(dropout_per_head(v_proj(x)))``: the query and key projections change neither the
    output nor any gradient, and are not computed (half of the block's four E×E products saved).
    Dropout on the attention weights becomes one keep/drop decision per example and head, scaled by
    1/(1-p), which is exactly what PyTorch's dropout on the [B, H, 1, 1] weights does; the number of
    heads only groups those decisions, so it is data.
    """

    dtype: Any = jnp.float32
    """The computation's dtype."""
    max_heads: int = 1
    """The most heads a member of the program has (static; a call's ``num_heads`` is data)."""

    @nn.compact
    def __call__(self, x, num_heads, live=True, *, train: bool = False, dropout_rate=0.0):
        """``live``: whether the member has this layer (a layer it does not have is initialised to zero)."""
        dim = x.shape[-1]
        # PyTorch: in_proj_weight [3E, E] Xavier-uniform, biases 0; out_proj Linear init, bias 0.
        v = torch_linear(dim, fan_in=dim, live=live, kernel=_uniform(math.sqrt(6.0 / (dim + 3 * dim))), bias=_zeros,
                         dtype=self.dtype, name="v_proj")(x)
        v = dropout(self, v, dropout_rate, train, _per_head(v.shape, num_heads, self.max_heads))
        attn = torch_linear(dim, fan_in=dim, live=live, bias=_zeros, dtype=self.dtype, name="out_proj")(v)
        return _layer_norm(live)(x + attn)


class AttentionHead(Head):
    """``num_layers`` × AttentionBlock over the input dims, then Linear(in→out) → LayerNorm → L2.

    A member with fewer real layers than the program passes the rest through (their params are zero
    and get no gradient): ``LayerNorm(x + 0)`` is not ``x``, so they are skipped, not zeroed."""

    @nn.compact
    def __call__(self, x, widths: Widths | None = None, *, train: bool = False, dropout_rate=None):
        w, in_dim = self._real(widths), x.shape[-1]
        dtype, rate = jnp.dtype(self.dtype), self._rate(dropout_rate)
        for layer in range(self.num_layers):
            live = layer < w.num_layers
            block = AttentionBlock(dtype, self.num_heads, name=f"AttentionBlock_{layer}")
            x = jnp.where(live, block(x, w.num_heads, live, train=train, dropout_rate=rate), x)
        z = self._out(x, in_dim, w=w)
        return l2_normalize(MaskedLayerNorm(name="LayerNorm_0")(z, w.output_dim))


class LinearHead(Head):
    """Dropout → Linear(in→out) → L2: one projection per modality, no hidden layer (what ``init: cca``
    can start at the CCA solution)."""

    @nn.compact
    def __call__(self, x, widths: Widths | None = None, *, train: bool = False, dropout_rate=None):
        w, in_dim = self._real(widths), x.shape[-1]
        x = dropout(self, x, self._rate(dropout_rate), train)
        return l2_normalize(self._out(x, in_dim, w=w))


def build_head(kind: str, *, output_dim: int, hidden_dim: int = 0, num_layers: int = 1, num_heads: int = 1,
               dropout: float = 0.0, dtype: str = "float32") -> Head:
    """A head of type ``kind`` at these static widths (the defaults of a call without ``widths``)."""
    if kind not in HEAD_TYPES:
        raise ValueError(f"unknown head type {kind!r}; choose one of {', '.join(HEAD_TYPES)}")
    cls = {"siglip": SiglipHead, "clip": ClipHead, "mlp": ClipHead, "attention": AttentionHead,
           "linear": LinearHead}[kind]
    extra = {"final_norm": True} if kind == "mlp" else {}
    return cls(output_dim=output_dim, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
               dropout=dropout, dtype=dtype, **extra)


def make_head(spec: HeadSpec, in_dim: int, dtype: str = "float32") -> Head:
    """One head of ``spec`` at its real widths for inputs of ``in_dim`` dims, its matmuls in ``dtype``;
    raises ValueError on an impossible spec."""
    if spec.type == "attention" and in_dim % spec.num_heads:
        raise ValueError(
            f"attention head: input dim {in_dim} is not divisible by num_heads={spec.num_heads}; "
            "choose num_heads that divides both input dims")
    return build_head(spec.type, output_dim=spec.output_dim, hidden_dim=spec.hidden_width(in_dim),
                      num_layers=spec.num_layers, num_heads=spec.num_heads, dropout=spec.dropout, dtype=dtype)


def make_heads(spec: HeadSpec, image_dim: int, text_dim: int, dtype: str = "float32") -> tuple[Head, Head]:
    """The image head and the text head at their real widths: same hyperparameters, each for its own
    input dim."""
    return make_head(spec, image_dim, dtype), make_head(spec, text_dim, dtype)
