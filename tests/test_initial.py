"""The initial design: recipes moved into the space, enqueued once, a warm start from an earlier
study, and the pruner that compares trials of the same init."""

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import write
from xclip_jax import initial, space
from xclip_jax import study as st
from xclip_jax.errors import UserError
from xclip_jax.initial import implicit_init
from xclip_jax.tune_config import ParamSpace, load_tune_config


def _cfg(tmp_path, **patch):
    return implicit_init(load_tune_config(write(tmp_path, **patch)))[0]


def test_nearest_values_of_the_space():
    assert initial.nearest(512, ParamSpace(choices=(64, 128, 256))) == 256
    assert initial.nearest(256, ParamSpace(choices=(64, 128, 1024))) == 128  # log distance: 2x beats 4x
    assert initial.nearest("softmax_infonce", ParamSpace(choices=("sigmoid_infonce",))) is None
    assert initial.nearest(1e-3, ParamSpace(type="float", low=1e-2, high=1e-1, log=True)) == 1e-2
    assert initial.nearest(0.07, ParamSpace(type="float", low=0.0, high=0.3, step=0.1)) == pytest.approx(0.1)
    assert initial.nearest(7.4, ParamSpace(type="int", low=1, high=5)) == 5


def test_the_closed_form_is_moved_into_the_space(tmp_path):
    cfg = _cfg(tmp_path)  # siglip, clip, mlp; softmax and sigmoid; batch 64/128; lr 1e-4..3e-2; output fixed
    (cca, source), (mlp, mlp_source) = initial.recipes(cfg)
    assert cca == {"head_type": "siglip", "init": "cca", "loss_type": "softmax_infonce", "batch_size": 128,
                   "learning_rate": 1e-3}
    assert "closed form" in source and mlp_source == "recipe: mlp"
    assert mlp == {"head_type": "mlp", "hidden_dim": 32, "loss_type": "softmax_infonce", "batch_size": 128,
                   "learning_rate": 1e-3}
    # a space without softmax gets the nearest loss; one without a CCA head no closed form
    no_softmax = _cfg(tmp_path, search_space={
        "head_type": {"type": "categorical", "choices": ["siglip"]},
        "loss_type": {"type": "categorical", "choices": ["sigmoid_infonce", "queue_infonce"]},
        "queue_size": {"type": "categorical", "choices": [256]}})
    assert initial.recipes(no_softmax)[0][0]["loss_type"] == "queue_infonce"
    no_cca = _cfg(tmp_path, search_space={"head_type": {"type": "categorical", "choices": ["clip"]}})
    assert initial.recipes(no_cca) == []
    never_cca = _cfg(tmp_path, search_init=False)
    assert [source for _, source in initial.recipes(never_cca)] == ["recipe: mlp"]
    assert initial.recipes(_cfg(tmp_path, initial_trials="none")) == []


def test_a_listed_initial_trial_must_fit(tmp_path):
    cfg = _cfg(tmp_path, initial_trials=[{"head_type": "mlp", "learning_rate": 5.0}])
    assert initial.recipes(cfg) == [({"head_type": "mlp", "learning_rate": 3e-2}, "initial_trials[0]")]
    with pytest.raises(UserError, match=r"initial_trials\[0\].*does not fit the search space"):
        initial.recipes(_cfg(tmp_path, initial_trials=[{"head_type": "attention"}]))
    with pytest.raises(UserError, match=r"initial_trials\[0\]\.learning_rat: unknown parameter.*learning_rate"):
        load_tune_config(write(tmp_path, initial_trials=[{"learning_rat": 1e-3}]))
    with pytest.raises(UserError, match="initial_trials must be recipes, none or a list"):
        load_tune_config(write(tmp_path, initial_trials="yes"))


def _study(cfg, storage):
    return st.open_study(storage, cfg)


def test_the_design_runs_first_once_and_counts(tmp_path):
    cfg = _cfg(tmp_path)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")
    design = initial.design(storage, None, cfg)
    study = _study(cfg, storage)
    line = initial.enqueue(study, design)
    assert line.startswith("initial design: 2 trials first (recipe: the closed form (siglip from CCA); recipe: mlp)")
    first = study.ask()
    params = space.sample(first, cfg)
    assert {name: params[name] for name in design[0][0]} == design[0][0]
    assert first.user_attrs[initial.INITIAL_ATTR].startswith("recipe: the closed form")
    study.tell(first, 0.5)
    assert initial.design(storage, study, cfg) is None  # a resume adds none
    assert initial.enqueue(study, initial.recipes(cfg)) is None
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1  # the mlp recipe, once
    assert st.counts(study)["finished"] == 1


def test_none_gives_the_plain_pruner_and_no_trial(tmp_path):
    cfg = _cfg(tmp_path, initial_trials="none")
    assert type(st.make_pruner(cfg)) is optuna.pruners.SuccessiveHalvingPruner
    assert isinstance(st.make_pruner(_cfg(tmp_path)), initial.ByInit)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")
    study = _study(cfg, storage)
    assert initial.enqueue(study, initial.design(storage, None, cfg)) is None
    assert study.get_trials() == []


def test_warm_start_takes_the_best_trials_that_fit(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    dists = {"head_type": optuna.distributions.CategoricalDistribution(["siglip", "clip", "attention"]),
             "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
    for value, head, lr in ((0.9, "attention", 1e-3), (0.8, "clip", 1e-2), (0.7, "clip", 0.5), (0.6, "siglip", 1e-3)):
        old.add_trial(optuna.trial.create_trial(params={"head_type": head, "learning_rate": lr},
                                                distributions=dists, value=value))
    cfg = _cfg(tmp_path, warm_start_from="old", warm_start_trials=2, initial_trials="none")
    picked = initial.warm_start(storage, cfg)
    assert [p for p, _ in picked] == [{"head_type": "clip", "learning_rate": 1e-2},
                                      {"head_type": "siglip", "learning_rate": 1e-3}]
    assert picked[0][1] == "warm start: study old trial 1 (0.8000)"
    assert isinstance(st.make_pruner(cfg), initial.ByInit)
    with pytest.raises(UserError, match="warm_start_from: no study 'gone' in this storage .*studies there: old"):
        initial.warm_start(storage, _cfg(tmp_path, warm_start_from="gone"))
    narrow = _cfg(tmp_path, warm_start_from="old", search_space={
        "head_type": {"type": "categorical", "choices": ["mlp"]}})
    with pytest.raises(UserError, match="none of study 'old''s 4 complete trials fits this search space"):
        initial.warm_start(storage, narrow)
    with pytest.raises(UserError, match="the storage .* is new"):
        initial.design(None, None, cfg)


def test_the_pruner_compares_trials_of_the_same_init(tmp_path):
    """A warm-started trial far ahead at the first rung prunes no cold trial; a cold one behind another
    cold one is still pruned (successive halving, reduction 2)."""
    cfg = _cfg(tmp_path)
    dists = {"init": optuna.distributions.CategoricalDistribution(["default", "cca"])}
    study = optuna.create_study(direction="maximize", pruner=st.make_pruner(cfg))
    values = []
    for init, value in (("cca", 0.9), ("default", 0.3), ("default", 0.35), ("default", 0.1)):
        study.enqueue_trial({"init": init})
        trial = study.ask(fixed_distributions=dists)
        trial.report(value, 1)
        values.append(trial.should_prune())
        study.tell(trial, value)
    assert values == [False, False, False, True]
    plain = optuna.create_study(direction="maximize", pruner=st.make_pruner(_cfg(tmp_path, initial_trials="none")))
    for init, value in (("cca", 0.9), ("default", 0.3)):
        plain.enqueue_trial({"init": init})
        trial = plain.ask(fixed_distributions=dists)
        trial.report(value, 1)
        pruned = trial.should_prune()
        plain.tell(trial, value)
    assert pruned  # one rung for both: the cold trial is pruned behind the warm one
