"""The study policy: the search space (conditions, changed spaces, choices checked against the data,
combinations skipped when sampled), the pruner's reach, asking and counting trials."""

import dataclasses
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import TUNE, write
from tests.test_faults import requires_pg
from xclip_jax import space
from xclip_jax import study as st
from xclip_jax.errors import UserError
from xclip_jax.storage import make_storage
from xclip_jax.tune_config import load_tune_config


def test_changed_search_space_is_one_clear_line(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    storage = make_storage(cfg.storage)
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    space.store_space(study, cfg)
    changed = load_tune_config(write(tmp_path, search_space={
        **yaml.safe_load(TUNE.format(n_trials=1, dir=tmp_path))["search_space"],
        "hidden_dim": {"type": "categorical", "choices": [16, 64]}}))
    # a study without trials may still change its space (e.g. after fixing what a check refused)
    space.check_space(study, changed)
    space.store_space(study, changed)
    assert study.user_attrs[space.SPACE_ATTR]["hidden_dim"]["choices"] == [16, 64]
    study.add_trial(optuna.trial.create_trial(params={"hidden_dim": 16}, value=0.5, distributions={
        "hidden_dim": optuna.distributions.CategoricalDistribution([16, 64])}))
    with pytest.raises(UserError) as e:
        space.check_space(optuna.load_study(study_name="tiny", storage=storage), cfg)
    msg = str(e.value)
    assert "hidden_dim" in msg and "[16, 32]" in msg and "[16, 64]" in msg and "new study_name" in msg
    assert "\n" not in msg
    space.store_space(study, cfg)  # refused spaces are never stored
    assert study.user_attrs[space.SPACE_ATTR]["hidden_dim"]["choices"] == [16, 64]


def test_pruner_that_never_prunes_is_warned(tmp_path):
    cfg = load_tune_config(write(tmp_path, pruner={"type": "SuccessiveHalvingPruner", "min_resource": 2,
                                                   "reduction_factor": 4, "min_early_stopping_rate": 1},
                                 max_epochs=8))
    msg = st.pruning_warning(cfg)
    assert "= 8" in msg and "steps 0–7" in msg and "never prune" in msg
    assert st.pruning_warning(load_tune_config(write(tmp_path))) is None
    default = load_tune_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert st.pruning_warning(default) is None


def test_conditional_parameters_follow_the_original(tmp_path):
    """The original's conditions, but hidden_dim is not sampled for attention, which ignores it."""
    cfg = _space(tmp_path, head_type={"type": "categorical", "choices": ["siglip", "clip", "mlp", "attention"]})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    heads = set()
    for _ in range(30):
        trial = study.ask()
        params = space.sample(trial, cfg)
        heads.add(params["head_type"])
        assert ("hidden_dim" in params) == (params["head_type"] in ("clip", "mlp"))
        study.tell(trial, 0.0)
    assert "attention" in heads
    asked = _space(tmp_path, head_type={"type": "categorical", "choices": ["clip", "attention"]},
                   hidden_dim={"type": "categorical", "choices": [16, 32], "when": {"head_type": ["attention"]}})
    trial = optuna.trial.FixedTrial({"head_type": "attention", "hidden_dim": 16, "loss_type": "softmax_infonce",
                                     "learning_rate": 1e-3, "batch_size": 64})
    assert "hidden_dim" in space.sample(trial, asked)  # an explicit `when:` still decides


def _space(tmp_path, **entries):
    raw = yaml.safe_load(TUNE.format(n_trials=4, dir=tmp_path))
    raw["search_space"].update(entries)
    return load_tune_config(write(tmp_path, search_space=raw["search_space"]))


def test_choices_that_can_never_run_are_refused_before_the_study(tmp_path):
    """The guide's num_heads [8, 12, 16, 20] against 1024/4096-dim inputs: 12 and 20 never divide them."""
    cfg = _space(tmp_path, head_type={"type": "categorical", "choices": ["clip", "attention"]},
                 num_heads={"type": "categorical", "choices": [8, 12, 16, 20]})
    with pytest.raises(UserError) as e:
        space.check_combinations(cfg, rows=1500, dims=(1024, 4096))
    msg = str(e.value)
    assert "search_space.num_heads" in msg and "12" in msg and "divid" in msg and "\n" not in msg
    fine = _space(tmp_path, head_type={"type": "categorical", "choices": ["clip", "attention"]},
                  num_heads={"type": "categorical", "choices": [8, 16]})
    assert space.check_combinations(fine, rows=1500, dims=(1024, 4096)) is None
    with pytest.raises(UserError, match="no combination"):  # the only head needs what no choice gives
        space.check_combinations(_space(tmp_path, head_type={"type": "categorical", "choices": ["attention"]},
                                     num_heads={"type": "categorical", "choices": [12, 20]}), 1500, (1024, 4096))


def test_combinations_only_some_draws_hit_are_skipped_when_sampled(tmp_path):
    """queue_size below batch_size: warned up front, then pruned from sampling (no process, no budget)."""
    cfg = _space(tmp_path, loss_type={"type": "categorical", "choices": ["softmax_infonce", "queue_infonce"]},
                 queue_size={"type": "categorical", "choices": [64, 256]})
    warning = space.check_combinations(cfg, rows=1500, dims=(16, 24))
    assert "queue_size 64 is smaller than training.batch_size 128" in warning and "skipped when sampled" in warning
    cfg = dataclasses.replace(cfg, n_trials=30)
    storage = make_storage(cfg.storage, heartbeat=(1, 5))
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    ran = []
    for _ in range(30):
        trial = st.ask_trial(study, storage, cfg, (16, 24), 1500)
        assert space.combination_problem(trial.params, cfg, (16, 24), 1500) is None
        ran.append(trial.number)
        study.tell(trial, 0.5)
    skipped = [t for t in study.get_trials() if space.SKIPPED_ATTR in t.system_attrs]
    assert skipped and all(t.state == TrialState.PRUNED and "smaller than training.batch_size" in t.user_attrs["skipped"]
                           for t in skipped)
    c = st.counts(study)
    assert c["finished"] == 30 and c["skipped"] == len(skipped)  # skipped draws count toward nothing


# Drivers sharing one storage: started together on a new one (schema and study created in a race),
# each asking trials as a driver does. Plain processes: the same calls as the driver, no training.
_ASKER = textwrap.dedent("""\
    import sys, time
    from xclip_jax import study as st
    from xclip_jax.storage import make_storage
    from xclip_jax.tune_config import load_tune_config
    cfg = load_tune_config(sys.argv[1])
    cfg = __import__("dataclasses").replace(cfg, storage=sys.argv[2], n_trials=1000)
    time.sleep(max(float(sys.argv[3]) - time.time(), 0))  # every process starts its storage calls at once
    storage = make_storage(cfg.storage, heartbeat=(1, 5))
    study = st.open_study(storage, cfg)
    for _ in range(int(sys.argv[4])):
        trial = st.ask_trial(study, storage, cfg, (16, 24), 1500)
        study.tell(trial, 0.5)
""")


def _fresh_pg_database():
    """A new, empty PostgreSQL database (dropped by the caller): a new storage, as a first driver meets it."""
    import sqlalchemy as sa

    from tests.test_faults import PG_URL  # the same server as the fault tests

    name = f"xclip_race_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    return PG_URL.rsplit("/", 1)[0] + f"/{name}", lambda: _drop(admin, name)


def _drop(admin, name):
    import sqlalchemy as sa

    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=requires_pg)])
def test_drivers_started_together_on_a_new_storage_all_run_and_never_repeat_draws(tmp_path, backend):
    cfg_path = write(tmp_path)
    if backend == "sqlite":
        url, drop = f"sqlite:///{tmp_path}/new.db", lambda: None
    else:
        url, drop = _fresh_pg_database()
    drivers, asks = 4, 5  # 4 × 5 = 20 ≥ 2 × the start-up trials (TPE's 10 by default)
    try:
        start = time.time() + 3
        procs = [subprocess.Popen([sys.executable, "-c", _ASKER, str(cfg_path), url, repr(start), str(asks)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(drivers)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * drivers, outs
        assert not any("unreachable" in out for out in outs)
        trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
        ran = [t for t in trials if space.SKIPPED_ATTR not in t.system_attrs]
        assert len(ran) == drivers * asks
        drawn = [tuple(sorted(t.params.items())) for t in ran]
        assert len(set(drawn)) == len(drawn), "two drivers drew the same parameters"
    finally:
        drop()


def test_a_resumed_study_does_not_repeat_its_first_trials(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    storage = make_storage(cfg.storage, heartbeat=(1, 5))
    first = st.open_study(storage, cfg)
    for _ in range(3):
        first.tell(st.ask_trial(first, storage, cfg, (16, 24), 1500), 0.5)
    resumed = st.open_study(make_storage(cfg.storage, heartbeat=(1, 5)), cfg)  # a new driver process's sampler
    for _ in range(3):
        resumed.tell(st.ask_trial(resumed, storage, cfg, (16, 24), 1500), 0.5)
    params = [tuple(sorted(t.params.items())) for t in resumed.get_trials() if space.SKIPPED_ATTR not in t.system_attrs]
    assert len(params) == 6 and len(set(params)) == 6


@pytest.mark.parametrize("kind,cls", [("tpe", "TPESampler"), ("gp", "GPSampler"), ("qmc", "QMCSampler"),
                                      ("random", "RandomSampler"), ("cmaes", "CmaEsSampler")])
def test_samplers_by_name(tmp_path, kind, cls, monkeypatch):
    """Each of Optuna's samplers by name draws this space's trials; a missing extra is one line naming it."""
    import importlib.util

    cfg_path = write(tmp_path, sampler={"type": kind, "seed": 3, "n_startup_trials": 2})
    if kind == "cmaes" and importlib.util.find_spec("cmaes") is None:
        with pytest.raises(Exception, match=r"sampler cmaes needs cmaes: pip install 'cmaes>=0\.10'"):
            load_tune_config(cfg_path)
        return
    cfg = load_tune_config(cfg_path)
    study = optuna.create_study(direction="maximize", sampler=st.make_sampler(cfg))
    for i in range(4):
        trial = study.ask()
        space.sample(trial, cfg)
        study.tell(trial, 0.1 * i)
    assert type(study.sampler._base).__name__ == cls
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    with pytest.raises(Exception, match=r"sampler gp needs torch: pip install 'torch>=2\.1' 'scipy>=1\.10'") as e:
        load_tune_config(write(tmp_path, sampler={"type": "gp"}))
    assert "\n" not in str(e.value)


def test_start_up_trials_count_bundles(tmp_path):
    """With batch_trials K, K x n_startup_trials trials are drawn at random (a bundle explores one
    structure), and the sampler is TPE only after them."""
    cfg = load_tune_config(write(tmp_path, batch_trials=4, sampler={"type": "tpe", "seed": 3, "n_startup_trials": 2}))
    sampler = st.make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trial = study.ask()
    assert sampler._base._n_startup_trials == 8
    study.tell(trial, 0.1)


def test_init_is_searched_where_a_head_can_start_from_cca(tmp_path):
    from xclip_jax.initial import implicit_init

    cfg = load_tune_config(write(tmp_path))  # head_type siglip, clip, mlp; no init anywhere
    searched, line = implicit_init(cfg)
    assert searched.search_space["init"].choices == ("default", "cca")
    assert "init searched over [default, cca] for the siglip head" in line and "search_init: false" in line
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # sampled for siglip only (its default condition)
        params = space.sample(study.ask(), searched)
        assert ("init" in params) == (params["head_type"] == "siglip")
    off = [load_tune_config(write(tmp_path, search_init=False)), load_tune_config(write(tmp_path, fixed={
        "output_dim": 16, "init": "default"})), load_tune_config(write(tmp_path, search_space={
            "head_type": {"type": "categorical", "choices": ["clip", "mlp"]}}))]
    for cfg_off in off:
        assert implicit_init(cfg_off) == (cfg_off, None)


@pytest.mark.parametrize("seed", [-3, 50_000, 2**40])
def test_any_integer_sampler_seed_draws(tmp_path, seed):
    """Samplers (and the per-trial reseeding) take any integer seed, reduced into [0, 2**32)."""
    from xclip_jax.spec import key_seed

    cfg = load_tune_config(write(tmp_path, sampler={"type": "tpe", "seed": seed, "n_startup_trials": 2}))
    study = optuna.create_study(sampler=st.make_sampler(cfg), direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert st.trial_seed(seed, 1) == st.trial_seed(key_seed(seed), 1)
    qmc = load_tune_config(write(tmp_path, sampler={"type": "qmc", "seed": seed}))
    optuna.create_study(sampler=st.make_sampler(qmc)).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
