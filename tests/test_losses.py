"""Losses against float64 numpy references written from SPEC §3, on random inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax import losses


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batch(seed=0, b=12, d=16, n_images=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_images, size=b)
    return _unit(rng, b, d), _unit(rng, b, d), ids


# ---- references (float64, straight from the formulas) ----


def ref_sigmoid(zi, zt, ids, tau, b=0.0, normalize="pairs"):
    logits = zi @ zt.T / tau + b
    pos = (ids[:, None] == ids[None, :]).astype(np.float64)
    bce = np.log1p(np.exp(-np.abs(logits))) + np.maximum(logits, 0) - logits * pos
    return bce.mean() if normalize == "pairs" else bce.sum() / len(ids)


def _log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def ref_softmax(zi, zt, ids, tau):
    logits = zi @ zt.T / tau
    pos = (ids[:, None] == ids[None, :]).astype(np.float64)
    b = len(ids)
    p = pos / pos.sum(1, keepdims=True)
    l_i2t = -(p * _log_softmax(logits)).sum() / b
    pt = pos.T / pos.T.sum(1, keepdims=True)
    l_t2i = -(pt * _log_softmax(logits.T)).sum() / b
    return (l_i2t + l_t2i) / 2


def ref_queue_loss(zi, zt, ids, q_emb, q_ids, q_valid, tau, mask_dup=True):
    b = len(ids)
    total = 0.0
    for i in range(b):
        row = []
        for j in range(b):
            if mask_dup and j != i and ids[j] == ids[i]:
                continue
            row.append((zi[i] @ zt[j] / tau, j == i))
        for k in range(len(q_ids)):
            if q_valid[k] and q_ids[k] != ids[i]:
                row.append((zi[i] @ q_emb[k] / tau, False))
        vals = np.array([v for v, _ in row])
        pos = [v for v, p in row if p][0]
        m = vals.max()
        total += -(pos - m - np.log(np.exp(vals - m).sum()))
    return total / b


class RefQueue:
    """A plain Python FIFO ring, as SPEC §3 describes it."""

    def __init__(self, size, dim):
        self.emb = np.zeros((size, dim))
        self.ids = np.full(size, -1)
        self.valid = np.zeros(size, bool)
        self.ptr = 0
        self.size = size

    def push(self, emb, ids):
        for e, i in zip(emb, ids):  # row by row: later rows overwrite earlier ones
            self.emb[self.ptr], self.ids[self.ptr], self.valid[self.ptr] = e, i, True
            self.ptr = (self.ptr + 1) % self.size


# ---- tests ----


@pytest.mark.parametrize("normalize", ["pairs", "batch"])
@pytest.mark.parametrize("bias", [0.0, -10.0, 1.7])
def test_sigmoid_matches_reference(normalize, bias):
    zi, zt, ids = _batch(1)
    tau = 0.05
    got = jax.jit(lambda a, b_, c: losses.sigmoid_infonce(a, b_, c, temperature=tau, bias=bias, normalize=normalize))(
        jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(ids))
    chex.assert_shape(got, ())
    np.testing.assert_allclose(float(got), ref_sigmoid(zi, zt, ids, tau, bias, normalize), rtol=2e-5)


@pytest.mark.parametrize("tau", [0.01, 0.07, 0.2])
def test_softmax_matches_reference(tau):
    zi, zt, ids = _batch(2, b=16, n_images=6)
    got = jax.jit(lambda a, b, c: losses.softmax_infonce(a, b, c, temperature=tau))(
        jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(ids))
    np.testing.assert_allclose(float(got), ref_softmax(zi, zt, ids, tau), rtol=2e-5)


def test_softmax_vmap_over_batches():
    zs = [_batch(s, b=8) for s in range(3)]
    zi = jnp.asarray(np.stack([z[0] for z in zs]), jnp.float32)
    zt = jnp.asarray(np.stack([z[1] for z in zs]), jnp.float32)
    ids = jnp.asarray(np.stack([z[2] for z in zs]))
    got = jax.vmap(lambda a, b, c: losses.softmax_infonce(a, b, c, temperature=0.1))(zi, zt, ids)
    want = [ref_softmax(*z, 0.1) for z in zs]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)


@pytest.mark.parametrize("mask_dup", [True, False])
def test_queue_loss_over_steps_with_wraparound(mask_dup):
    """Several steps: partial fill, a wrapping batch, a batch larger than the queue."""
    size, dim = 10, 8
    rng = np.random.default_rng(3)
    ref = RefQueue(size, dim)
    q = losses.init_queue(size, dim)
    step = jax.jit(lambda a, b, c, qq: losses.queue_infonce(a, b, c, qq, temperature=0.1,
                                                            mask_batch_duplicates=mask_dup))
    for b in (4, 4, 4, 13, 3):  # 12 rows wrap past 10; 13 > size keeps the last 10
        zi, zt = _unit(rng, b, dim), _unit(rng, b, dim)
        ids = rng.integers(0, 6, size=b)
        want = ref_queue_loss(zi, zt, ids, ref.emb, ref.ids, ref.valid, 0.1, mask_dup)
        loss, q = step(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(ids), q)
        ref.push(zt, ids)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(q.emb_QxD), ref.emb, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(q.ids_Q)[ref.valid], ref.ids[ref.valid])
        np.testing.assert_array_equal(np.asarray(q.valid_Q), ref.valid)
        assert int(q.ptr) == ref.ptr


def test_queue_enqueue_takes_no_gradient():
    zi, zt, ids = _batch(4, b=6, d=8)
    q = losses.init_queue(16, 8)

    def f(zt_):
        _, new_q = losses.queue_infonce(jnp.asarray(zi, jnp.float32), zt_, jnp.asarray(ids), q, temperature=0.1)
        return jnp.sum(new_q.emb_QxD)

    g = jax.grad(f)(jnp.asarray(zt, jnp.float32))
    assert float(jnp.abs(g).sum()) == 0.0


def test_temperature_clamp():
    assert float(losses.temperature_from_log_scale(jnp.log(1 / 0.05))) == pytest.approx(0.05, rel=1e-6)
    # the bound is kept on the parameter (after each update), where it has a gradient below it
    assert float(losses.temperature_from_log_scale(losses.clamp_log_scale(jnp.asarray(20.0)))) == pytest.approx(
        0.01, rel=1e-6)
    assert float(losses.clamp_log_scale(jnp.asarray(2.0))) == 2.0


def _queue_case(seed=4, b=16, d=32, q=24):
    zi, zt, ids = _batch(seed, b=b, d=d, n_images=6)
    queue = losses.enqueue(losses.init_queue(q, d), jnp.asarray(_unit(np.random.default_rng(seed + 1), 20, d)),
                           jnp.arange(100, 120))
    return jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(ids), queue


def _rows_from_one_logits(zi, zt, ids, queue, tau, logits_fn):
    """mean(lse_rows − diag(logits)) from one computed logits matrix per block, masked as SPEC §3."""
    neg = jnp.finfo(jnp.float32).min
    bb, bq = logits_fn(zi, zt, tau), logits_fn(zi, queue.emb_QxD, tau)
    same = (ids[:, None] == ids[None, :]) & ~jnp.eye(len(ids), dtype=bool)
    bq = jnp.where((queue.ids_Q[None, :] == ids[:, None]) | ~queue.valid_Q[None, :], neg, bq)
    lse = jax.nn.logsumexp(jnp.concatenate([jnp.where(same, neg, bb), bq], axis=1), axis=1)
    return lse - jnp.diagonal(bb)


def test_queue_loss_takes_its_positive_from_the_logits_it_normalises(monkeypatch):
    """The queue loss's positive term is the diagonal of the very logits its log-sum-exp sees. A matmul
    that rounds (TF32 on a GPU; here its stand-in, logits rounded to bfloat16) made a separate
    elementwise positive differ by ~1e-3/τ, and a row's loss could go negative."""
    tau = 0.01

    def rounding_logits(a, b, temperature):
        return (jnp.matmul(a, b.T).astype(jnp.bfloat16).astype(jnp.float32)) / temperature

    monkeypatch.setattr(losses, "_logits", rounding_logits)
    zi, zt, ids, queue = _queue_case()
    loss, _ = losses.queue_infonce(zi, zt, ids, queue, temperature=tau)
    rows = _rows_from_one_logits(zi, zt, ids, queue, tau, rounding_logits)
    np.testing.assert_allclose(float(loss), float(jnp.mean(rows)), rtol=1e-6)
    assert float(jnp.min(rows)) >= 0.0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="TF32 matmuls exist on a GPU only")
def test_queue_loss_under_tf32_matmuls():
    """The same on a GPU at JAX's default float32 matmul precision (TF32 on recent NVIDIA cards)."""
    zi, zt, ids, queue = _queue_case()
    with jax.default_matmul_precision("tensorfloat32"):
        loss, _ = losses.queue_infonce(zi, zt, ids, queue, temperature=0.01)
        rows = _rows_from_one_logits(zi, zt, ids, queue, 0.01, losses._logits)
    np.testing.assert_allclose(float(loss), float(jnp.mean(rows)), rtol=1e-5)
    assert float(jnp.min(rows)) >= 0.0
