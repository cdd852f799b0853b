"""Padded programs: a member at its real widths inside larger buckets computes what the same trial
computes unpadded (params, losses, metrics), its padded units stay exactly zero, and members of
different widths, layers, heads and queue sizes share one program, each as it would run alone."""

import jax
import numpy as np
import pytest

from xclip_jax import data
from xclip_jax.fit import fit_bundle
from xclip_jax.model import hparams, member, param_shapes, real_key, stack
from xclip_jax.padding import Buckets, bucket, program_key
from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
from xclip_jax.step import fresh_states, to_device

DI, DT = 12, 16
EPOCHS = 3
# Every width of the cases below pads to a larger bucket (a queue of 48 live slots in 200).
WIDE = Buckets.of("max", {"output_dim": (8, 24), "hidden_dim": (16, 40), "num_layers": (1, 3), "queue_size": (48, 200),
                          "num_heads": (1, 4)})


@pytest.fixture(scope="module")
def sets():
    s = data.synthetic_splits(n_images=200, captions_per_image=3, image_dim=DI, text_dim=DT, val_images=60,
                              test_images=10, noise=0.5, seed=0)
    return to_device(s["train"]), to_device(s["val"])


def _spec(head, loss, *, output=8, hidden=16, layers=1, heads=2, queue=48, dropout=0.0, lr=3e-3, tau=0.07):
    return RunSpec(HeadSpec(head, output, hidden, dropout, heads, layers),
                   LossSpec(loss, tau, learnable_temp=True, queue_size=queue),
                   TrainingSpec(batch_size=64, learning_rate=lr), DI, DT)


def _train(specs, key, sets):
    """``specs`` as one bundle under ``key`` for EPOCHS epochs: (final states, fit states)."""
    states = fresh_states(key, stack([hparams(s, 10 + i) for i, s in enumerate(specs)]))
    return fit_bundle(states, *sets, num_epochs=EPOCHS, patience=EPOCHS, hooks=[()] * len(specs), ks=(1, 5))


def _alone(spec, seed, sets):
    states = fresh_states(program_key(spec), stack([hparams(spec, seed)]))
    return fit_bundle(states, *sets, num_epochs=EPOCHS, patience=EPOCHS, hooks=[()], ks=(1, 5))[1][0]


def _same_run(padded, alone):
    assert [h["epoch"] for h in padded.history] == [h["epoch"] for h in alone.history] == list(range(EPOCHS))
    for a, b in zip(padded.history, alone.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["val_metrics"] == pytest.approx(b["val_metrics"], abs=1e-9)
    assert padded.best_epoch == alone.best_epoch
    # best_params are each member's real widths, cut from its padded arrays
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5), padded.best_params,
                 alone.best_params)


def _padding_is_zero(states, i):
    """Every entry of member i's heads outside its real widths is exactly zero."""
    params = jax.device_get(member(states.params, i))
    real = param_shapes(real_key(states.key, jax.device_get(member(states.hp, i))))

    def check(tree, shapes, path):
        for name, sub in tree.items():
            if isinstance(sub, dict):
                check(sub, shapes.get(name, {}), f"{path}/{name}")
                continue
            rest = np.array(sub)
            if name in shapes:
                rest[tuple(slice(0, n) for n in shapes[name].shape)] = 0
            assert not rest.any(), f"{path}/{name} has non-zero padding"

    check({"image": params["image"], "text": params["text"]}, real, "")


CASES = [("linear", "queue_infonce", {}), ("siglip", "queue_infonce", {}), ("clip", "queue_infonce", {}),
         ("mlp", "queue_infonce", {}), ("clip", "sigmoid_infonce", {}), ("clip", "softmax_infonce", {}),
         ("attention", "softmax_infonce", {"layers": 1}), ("attention", "queue_infonce", {"layers": 2}),
         ("attention", "sigmoid_infonce", {"layers": 3})]


@pytest.mark.parametrize("head,loss,kw", CASES, ids=[f"{h}-{loss}-{kw}" for h, loss, kw in CASES])
def test_a_padded_member_trains_as_it_would_unpadded(sets, head, loss, kw):
    spec = _spec(head, loss, **kw)
    key = program_key(spec, WIDE)
    assert key != program_key(spec) and key.output_dim == 24
    states, (padded,) = _train([spec], key, sets)
    _same_run(padded, _alone(spec, 10, sets))
    _padding_is_zero(states, 0)


@pytest.mark.parametrize("head,loss", [("attention", "softmax_infonce"), ("siglip", "queue_infonce"),
                                       ("clip", "queue_infonce"), ("mlp", "sigmoid_infonce")])
def test_with_dropout_the_padded_units_stay_zero_and_the_real_ones_match(sets, head, loss):
    """With dropout a padded member's padded units never move, and its run is the unpadded one:
    dropout on inputs (siglip), on the attention heads' groups and on a padded hidden layer (clip,
    mlp: drawn [H, B], whose first h rows are the [h, B] draw) draws the same decisions padded or not."""
    spec = _spec(head, loss, dropout=0.3, layers=2)
    states, (padded,) = _train([spec], program_key(spec, WIDE), sets)
    _padding_is_zero(states, 0)
    _same_run(padded, _alone(spec, 10, sets))


@pytest.mark.parametrize("head,loss", [("attention", "queue_infonce"), ("clip", "queue_infonce")])
def test_members_of_other_widths_share_one_program_each_as_alone(sets, head, loss):
    """Three members with different output and hidden widths, layers, attention heads, queue sizes,
    learning rates and temperatures in one program: each ends where its own unpadded run ends."""
    specs = [_spec(head, loss, output=8, hidden=16, layers=1, heads=2, queue=48, lr=3e-3, tau=0.07),
             _spec(head, loss, output=24, hidden=40, layers=3, heads=4, queue=200, lr=1e-3, tau=0.1),
             _spec(head, loss, output=13, hidden=23, layers=2, heads=1, queue=100, lr=5e-3, tau=0.05)]
    keys = {program_key(s, WIDE) for s in specs}
    assert len(keys) == 1
    states, fit_states = _train(specs, keys.pop(), sets)
    for i, spec in enumerate(specs):
        _same_run(fit_states[i], _alone(spec, 10 + i, sets))
        _padding_is_zero(states, i)


def test_buckets():
    assert [bucket(v, (1, 2, 3), "pow2") for v in (1, 2, 3)] == [1, 2, 3]
    assert [bucket(v, (100, 300, 2048), "pow2") for v in (100, 300, 2048)] == [128, 512, 2048]
    assert [bucket(v, (128, 512), "max") for v in (128, 512)] == [512, 512]
    assert bucket(96, (96, 512), "exact") == 96
    b = Buckets.of("max", {"hidden_dim": (None, 64), "output_dim": (8, 16)})
    assert b.pad("hidden_dim", 6, in_dim=12) == 64 and b.pad("hidden_dim", 80, in_dim=160) == 80
    assert b.spread("output_dim") is False and Buckets.of("exact", dict(b.sizes)).spread("output_dim") is True
    spec = _spec("attention", "queue_infonce", output=8, layers=2, queue=48)
    assert program_key(spec, WIDE) == program_key(_spec("attention", "queue_infonce", output=24, layers=1, queue=200),
                                                  WIDE)
    # widths a head or loss does not have are no part of its key
    assert program_key(_spec("siglip", "softmax_infonce", hidden=16, layers=1, queue=48)) == program_key(
        _spec("siglip", "softmax_infonce", hidden=40, layers=3, queue=200))
    with pytest.raises(ValueError, match="padding must be one of"):
        Buckets("largest")


@pytest.mark.parametrize("head", ["clip", "mlp"])
def test_a_default_hidden_width_is_each_sides_own_half_padded_or_not(sets, head):
    """``hidden_dim`` None is in_dim // 2 on each side: image 12 -> 6, text 16 -> 8. A padded member
    trains as its unpadded run, and both hand over heads of those widths (what a checkpoint stores
    and export writes)."""
    spec = _spec(head, "softmax_infonce", hidden=None)
    key = program_key(spec, WIDE)
    assert key.hidden == (40, 40) and program_key(spec).hidden == (DI // 2, DT // 2)
    _, (padded,) = _train([spec], key, sets)
    alone = _alone(spec, 10, sets)
    _same_run(padded, alone)
    for fs in (padded, alone):
        assert fs.best_params["image"]["Dense_0"]["kernel"].shape == (DI, DI // 2)
        assert fs.best_params["text"]["Dense_0"]["kernel"].shape == (DT, DT // 2)
        assert fs.best_params["text"]["Dense_1"]["kernel"].shape == (DT // 2, 8)
