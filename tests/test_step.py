"""The step module: the train step, one-program epochs, the optimizer, and learning on the synthetic set."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xclip_jax import data, train_step
from xclip_jax.fit import fit
from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
from xclip_jax.encode import project
from xclip_jax.metrics import retrieval_metrics_indexed
from xclip_jax.model import hparams, member, stack
from xclip_jax.spec import RunSpec
from xclip_jax.step import create_train_state, make_optimizer, run_epochs, to_device

DI, DT = 32, 48


@pytest.fixture(scope="module")
def sets():
    return data.synthetic_splits(n_images=1200, captions_per_image=5, image_dim=DI, text_dim=DT, val_images=200,
                                 test_images=50, noise=0.5, seed=0, latent_dim=16)


def _spec(head="clip", loss="softmax_infonce", batch=256, epochs=4, dropout=0.0, temperature=0.05, lr=2e-3, wd=1e-4,
          clip=1.0, **loss_kw):
    return RunSpec(HeadSpec(head, 32, 64, dropout, 4, 1),
                   LossSpec(loss, temperature, queue_size=256, **loss_kw),
                   TrainingSpec(batch_size=batch, learning_rate=lr, weight_decay=wd, num_epochs=epochs, patience=epochs,
                                max_grad_norm=clip),
                   DI, DT)


def _state(head="clip", loss="softmax_infonce", seed=0, **kw):
    return create_train_state(_spec(head, loss, **kw), seed=seed)


def run_epoch(state, d):
    """One epoch of one trial's state (no member axis): the epoch program of a bundle of one."""
    states, metrics = run_epochs(jax.tree.map(lambda x: x[None], state), d, np.array([True]))
    return member(states, 0), member(metrics, 0)


def _batch(d, n=64):
    idx = jnp.arange(n)
    return {"image": d.image_NxDi[d.row_image_R[idx]], "text": d.text_RxDt[idx], "ids": d.row_image_R[idx]}


def test_train_step_is_pure_and_importable(sets):
    d = to_device(sets["train"])
    s1, m1 = train_step(_state(), _batch(d))
    s2, m2 = train_step(_state(), _batch(d))
    assert int(s1.step) == 1
    chex.assert_trees_all_close(s1.params, s2.params)
    assert float(m1["loss"]) == float(m2["loss"]) > 0
    assert {"loss", "grad_norm", "temperature"} <= set(m1)


def test_epoch_compiles_once_per_key_and_hyperparameters_travel_as_data(sets):
    d = to_device(sets["train"])
    state = _state("siglip", "sigmoid_infonce")
    before = run_epochs._cache_size()
    for _ in range(3):
        state, metrics = run_epoch(state, d)
    assert run_epochs._cache_size() == before + 1
    assert int(state.step) == 3 * (d.rows // 256)
    # another trial's learning rate, weight decay, clipping, temperature, dropout, loss switches and
    # seed: the same program...
    kw = dict(dropout=0.25, temperature=0.1, lr=1e-2, wd=0.3, epochs=9, clip=0.05, learnable_temp=True,
              learnable_bias=False, sigmoid_normalize="batch")
    other = _state("siglip", "sigmoid_infonce", seed=1, **kw)
    assert other.key == state.key
    _, m_other = run_epoch(other, d)
    assert run_epochs._cache_size() == before + 1
    # ...which still reads each value from the state: every one of them changes the result
    _, m_ref = run_epoch(_state("siglip", "sigmoid_infonce", seed=1), d)
    for name, value in kw.items():
        if name == "epochs":
            continue
        _, m = run_epoch(_state("siglip", "sigmoid_infonce", seed=1, **{name: value}), d)
        assert float(m["loss"]) != float(m_ref["loss"]), name
    assert run_epochs._cache_size() == before + 1


def test_frozen_loss_params_never_move(sets):
    """Fixed temperature / bias never move (not even by weight decay); learnable ones do."""
    d = to_device(sets["train"])
    state, _ = run_epoch(_state("siglip", "sigmoid_infonce", learnable_bias=False), d)
    assert float(state.params["loss"]["bias"]) == 0.0
    assert float(state.params["loss"]["log_scale"]) == pytest.approx(np.log(1 / 0.05), rel=1e-6)
    learn, _ = run_epoch(_state("siglip", "sigmoid_infonce", learnable_temp=True), d)
    assert float(learn.params["loss"]["bias"]) != -10.0
    assert float(learn.params["loss"]["log_scale"]) != pytest.approx(np.log(1 / 0.05), rel=1e-6)


def test_optimizer_clips_global_norm():
    """Adam's first step normalises any gradient, so check the clip where it shows: Adam's second
    moment after one step is (1 - b2) * g**2 of the *clipped* gradient."""
    from xclip_jax.step import frozen_loss_updates

    hp = hparams(RunSpec(HeadSpec("siglip", 4), LossSpec(), TrainingSpec(max_grad_norm=0.5, learning_rate=1.0,
                                                                         weight_decay=0.0), 3, 3), 0)
    params = {"image": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)},
              "loss": {"log_scale": jnp.zeros(()), "bias": jnp.zeros(())}}
    tx = make_optimizer(hp)
    grads = {"image": {"w": jnp.array([30.0, -40.0, 0.0])}, "text": {"w": jnp.array([0.0, 0.0, 120.0])},
             "loss": {"log_scale": jnp.zeros(()), "bias": jnp.zeros(())}}
    updates, opt_state = tx.update(grads, tx.init(params), params)
    updates = frozen_loss_updates(hp, updates)
    scale = 0.5 / 130.0  # global norm of the gradient: sqrt(30² + 40² + 120²) = 130
    nu = _adam_nu(opt_state)
    b2 = 0.999
    np.testing.assert_allclose(nu["image"]["w"], (1 - b2) * (scale * np.array([30.0, -40.0, 0.0])) ** 2, rtol=1e-5)
    np.testing.assert_allclose(nu["text"]["w"], (1 - b2) * (scale * np.array([0.0, 0.0, 120.0])) ** 2, rtol=1e-5)
    # frozen loss params get no update
    assert float(updates["loss"]["bias"]) == 0.0 and float(updates["loss"]["log_scale"]) == 0.0


def _adam_nu(opt_state):
    return opt_state.inner_states["heads"].inner_state[1][0].nu


def test_frozen_loss_params_do_not_count_in_the_clip(sets):
    """A fixed temperature's (and a switched-off bias's) gradients are not trained: they neither set
    the heads' clip factor nor the reported grad norm. Here the heads' gradient norm is below
    max_grad_norm, so their update is not clipped: Adam's ν is (1 − b2)·g² of the raw gradient."""
    d = to_device(sets["train"])
    batch = _batch(d)
    spec = _spec("siglip", "sigmoid_infonce", learnable_bias=False)
    state = create_train_state(spec, seed=0)
    from xclip_jax.model import apply_heads
    from xclip_jax.step import compute_loss, dropout_key

    def loss_fn(params):
        zi, zt = apply_heads(state.key, state.hp, params, batch["image"], batch["text"], rng=dropout_key(state))
        return compute_loss(state.key, state.hp, params["loss"], zi, zt, batch["ids"], None)[0]

    grads = jax.grad(loss_fn)(state.params)
    heads_norm = float(optax.tree.norm({"image": grads["image"], "text": grads["text"]}))
    global_norm = float(optax.tree.norm(grads))
    assert global_norm > heads_norm * 1.01  # the frozen log_scale's gradient adds to the global norm
    clip = (heads_norm + global_norm) / 2  # above the heads' norm, below the global one
    state = create_train_state(dataclasses.replace(spec, training=dataclasses.replace(spec.training, max_grad_norm=clip)),
                               seed=0)
    new, metrics = train_step(state, batch)
    assert float(metrics["grad_norm"]) == pytest.approx(heads_norm, rel=1e-4)
    b2 = 0.999
    jax.tree.map(lambda nu, g: np.testing.assert_allclose(nu, (1 - b2) * np.asarray(g) ** 2, rtol=1e-3, atol=1e-12),
                 _adam_nu(new.opt_state)["image"], grads["image"])


def test_a_learnable_scale_above_its_bound_comes_back():
    """The scale's bound holds on the parameter after each update, with a gradient at every value: a
    log_scale that got above log 100 is back at the bound after one step, and moves on from there."""
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((32, DI)), jnp.float32),
             "text": jnp.asarray(rng.standard_normal((32, DT)), jnp.float32),
             "ids": jnp.asarray(np.arange(32), jnp.int32)}
    state = create_train_state(_spec("siglip", "softmax_infonce", batch=32, learnable_temp=True, lr=1e-2), seed=0)
    bound = float(np.log(100.0))
    state = state.replace(params={**state.params, "loss": {**state.params["loss"], "log_scale": jnp.float32(bound + 1)}})
    state, _ = train_step(state, batch)
    assert float(state.params["loss"]["log_scale"]) <= bound + 1e-6
    scales = []
    for _ in range(5):
        state, metrics = train_step(state, batch)
        scales.append(float(state.params["loss"]["log_scale"]))
        assert float(metrics["temperature"]) >= 0.01 - 1e-7
    assert min(scales) < bound - 1e-3  # random pairs ask for a higher temperature: it leaves the bound


def test_dropout_and_shuffle_keys_never_coincide():
    """The state's key is split once into streams: no step's dropout key (either head's) is any
    epoch's shuffle key. One stream derived from the other by fold_in collides under partitionable
    threefry, where split(k)[i] == fold_in(k, i)."""
    from xclip_jax.step import dropout_key, shuffle_key

    assert jax.config.jax_threefry_partitionable  # the PRNG mode the golden numbers below were taken in
    state = create_train_state(_spec(), seed=0)
    keys = []
    for step in range(40):
        at = state.replace(step=jnp.int32(step))
        keys += [shuffle_key(at), *jax.random.split(dropout_key(at))]
    as_tuples = {tuple(np.asarray(jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k).ravel())
                 for k in keys}
    assert len(as_tuples) == len(keys)


def test_validation_loss_ignores_the_training_queue(sets):
    """The queue holds training texts and training ids: the validation loss must not depend on it."""
    from xclip_jax.step import eval_loss

    train_d, val_d = to_device(sets["train"]), to_device(sets["val"])
    state = _state("mlp", "queue_infonce")
    trained, _ = run_epoch(state, train_d)  # its queue is full of training texts
    empty = trained.replace(queue=state.queue)
    assert bool(jnp.any(trained.queue.valid_Q)) and not bool(jnp.any(empty.queue.valid_Q))
    assert float(eval_loss(trained, val_d)) == pytest.approx(float(eval_loss(empty, val_d)), rel=1e-6)


# Recorded once from one train_step of the default-initialised heads on the fixed batch below: a
# changed default (init, loss formula, optimizer, dropout, RNG use) moves these numbers. They moved
# once with padded programs: a kernel is drawn column by column, so a padded member draws what its
# unpadded run draws (the same distributions, other draws: the checksums moved by < 4 %); the
# attention head's again when its dropout drew one decision per head from fold_in(key, head), B x
# heads draws instead of B x D (its loss after the step moved 1.5 %, its checksum < 0.001 %); clip's
# and mlp's when their hidden dropout drew [H, B] and transposed, so that a padded hidden layer drops
# what its unpadded run drops (their losses after the step moved 2.3 %, their checksums < 0.04 %).
GOLDEN = {  # (loss after the step, sum of |params| after it)
    ("siglip", "sigmoid_infonce"): (0.6544977426528931, 426.91822892427444),
    ("clip", "softmax_infonce"): (6.761431694030762, 677.7982716560364),
    ("mlp", "queue_infonce"): (6.954463958740234, 742.0211438313127),
    ("attention", "softmax_infonce"): (8.569670677185059, 924.0217889770865),
}


def _golden_run(head, loss):
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((32, DI)), jnp.float32),
             "text": jnp.asarray(rng.standard_normal((32, DT)), jnp.float32),
             "ids": jnp.asarray(np.repeat(np.arange(16), 2), jnp.int32)}
    state = create_train_state(_spec(head, loss, batch=32, dropout=0.1, learnable_temp=True), seed=3)
    state, metrics = train_step(state, batch)
    checksum = sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(state.params))
    return float(metrics["loss"]), checksum


@pytest.mark.parametrize("head,loss", list(GOLDEN))
def test_golden_single_step(head, loss):
    got = _golden_run(head, loss)
    np.testing.assert_allclose(got, GOLDEN[(head, loss)], rtol=2e-5, err_msg="a default changed?")


def test_an_epoch_makes_no_host_transfer(sets):
    d = to_device(sets["train"])
    states = jax.tree.map(lambda x: x[None], _state("mlp", "queue_infonce"))
    active = jax.device_put(np.array([True]))
    states, _ = run_epochs(states, d, active)  # compiled outside the guard
    with jax.transfer_guard("disallow"):
        states, metrics = run_epochs(states, d, active)
        states, metrics = run_epochs(states, d, active)
    assert np.isfinite(float(metrics["loss"][0]))


@pytest.mark.parametrize("head,loss", [
    ("siglip", "sigmoid_infonce"), ("clip", "softmax_infonce"), ("mlp", "queue_infonce"), ("attention", "softmax_infonce"),
])
def test_every_head_and_loss_learns(sets, head, loss):
    train_d, val_d = to_device(sets["train"]), to_device(sets["val"])
    chance = 1.0 / sets["val"].n_images
    state = _state(head, loss)
    before = retrieval_metrics_indexed(*project(state.params, _spec(head, loss), val_d), val_d.row_image_R)["r1"]
    _, fs = fit(_state(head, loss), train_d, val_d, num_epochs=4, patience=4, progress=False)
    assert fs.best_r1 > max(20 * chance, 3 * before), (head, loss, before, fs.best_r1)


def test_sigmoid_bias_learns_where_the_original_collapses():
    """SPEC §3: with ~B negatives per positive, b = 0 collapses to chance; the learnable bias learns."""
    sets = data.synthetic_splits(n_images=4000, captions_per_image=5, image_dim=DI, text_dim=DT, val_images=200,
                                 test_images=20, noise=0.5, seed=1, latent_dim=16)
    train_d, val_d = to_device(sets["train"]), to_device(sets["val"])
    chance = 1.0 / sets["val"].n_images
    r1 = {}
    for bias in (True, False):
        spec = RunSpec(HeadSpec("siglip", 32), LossSpec("sigmoid_infonce", 0.05, learnable_bias=bias),
                         TrainingSpec(batch_size=1024, learning_rate=3e-3, num_epochs=5, patience=5), DI, DT)
        r1[bias] = fit(create_train_state(spec, seed=0), train_d, val_d, num_epochs=5, patience=5,
                       progress=False)[1].best_r1
    assert r1[True] > 20 * chance, r1  # measured 0.236 (47x chance)
    assert r1[False] < 3 * chance, r1  # measured 0.007


@pytest.mark.parametrize("head,loss", [
    ("siglip", "sigmoid_infonce"), ("clip", "softmax_infonce"), ("mlp", "queue_infonce"), ("attention", "softmax_infonce"),
])
def test_a_bundle_epoch_is_each_member_alone(sets, head, loss):
    """Three members of one shape in one vmapped epoch: each ends where its own run_epoch ends (its
    own shuffle, dropout, optimizer state, queue); a member marked inactive does not move."""
    from xclip_jax.padding import program_key
    from xclip_jax.programs import Programs
    from xclip_jax.step import fresh_states

    d = to_device(sets["train"])
    specs = [_spec(head, loss, dropout=0.1, lr=lr, temperature=t) for lr, t in ((2e-3, 0.05), (5e-3, 0.1), (1e-3, 0.07))]
    key = program_key(specs[0])
    bundle = fresh_states(key, stack([hparams(s, i) for i, s in enumerate(specs)]), Programs().init_fn(key, 3))
    bundle, metrics = run_epochs(bundle, d, np.array([True, False, True]))
    for i in (0, 2):
        alone, m = run_epoch(create_train_state(specs[i], seed=i), d)
        np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=2e-5)
        jax.tree.map(lambda b, a: np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-6), bundle.params, alone.params)
    frozen = create_train_state(specs[1], seed=1)
    # untouched: its initial params (the bundle's init program is compiled with fewer optimisations, the
    # same draws to the last bit or two)
    jax.tree.map(lambda b, a: np.testing.assert_allclose(b[1], a, rtol=1e-6, atol=1e-7), bundle.params, frozen.params)
    assert int(bundle.step[1]) == 0 and int(bundle.step[0]) == d.rows // 256


def test_any_integer_seed_trains_and_is_reduced_by_one_rule():
    """A trial's seed is sampler.seed * 100003 + number: a sampler seed of 42,950 or more, or a
    negative training seed, overflowed the key's uint32. Every integer works, reduced mod 2**32."""
    from xclip_jax.spec import key_seed
    from xclip_jax.tune_config import trial_config, TuneConfig, SamplerConfig
    from xclip_jax.config import DataConfig, SyntheticData

    cfg = TuneConfig(data=DataConfig(synthetic=SyntheticData()), sampler=SamplerConfig(seed=50_000))
    seed = trial_config(cfg, {}, trial_number=7).seed
    assert seed >= 2**32
    big = create_train_state(_spec(), seed=seed)
    same = create_train_state(_spec(), seed=seed % 2**32)
    jax.tree.map(np.testing.assert_array_equal, big.params, same.params)
    minus_one = create_train_state(_spec(), seed=-1)
    top = create_train_state(_spec(), seed=2**32 - 1)
    jax.tree.map(np.testing.assert_array_equal, minus_one.params, top.params)
    assert key_seed(-1) == 2**32 - 1 and key_seed(2**32 + 5) == 5


def _primitives(jaxpr, skip=("cond",)):
    """The primitives a jaxpr runs unconditionally: its equations' and their sub-jaxprs', except
    those inside a ``cond``'s branches."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if eqn.primitive.name in skip:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names += _primitives(inner, skip)
    return names


@pytest.mark.parametrize("head", ["siglip", "clip", "mlp", "attention"])
def test_a_member_at_dropout_zero_draws_nothing(sets, head):
    """A member's dropout (a traced rate) draws its masks under a cond on rate > 0: its step's only
    random bits run inside the cond, so a member at rate 0 draws none."""
    from xclip_jax.step import _train_step

    state = _state(head, "softmax_infonce", dropout=0.0)
    jaxpr = jax.make_jaxpr(_train_step)(state, _batch(to_device(sets["train"]))).jaxpr
    assert "random_bits" not in _primitives(jaxpr)
    assert "random_bits" in _primitives(jaxpr, skip=())  # the draws are there, under the cond
