"""The tuning config: the original's optuna YAML, its search space and each trial's training config."""

import dataclasses

import pytest
import yaml

from tests.conftest import TUNE as TINY_STUDY
from tests.conftest import write
from tests.test_config import ORIGINAL_FULL, ROOT, _bad  # noqa: F401  (the shared training-config fixtures)
from xclip_jax.config import ConfigError, TrainConfig, dump_yaml, load_train_config
from xclip_jax.tune_config import TuneConfig, load_tune_config, trial_config


@pytest.mark.parametrize("name", ["default.yaml", "quickstart.yaml"])
def test_shipped_tuning_configs_load(name):
    cfg = load_tune_config(ROOT / "configs" / name)
    assert cfg.search_space["head_type"].choices == ("siglip", "clip", "attention", "mlp")
    if name == "quickstart.yaml":  # the set where the head matters (see the README's Baselines)
        assert cfg.data.synthetic.fold == 0.75 and cfg.data.synthetic.latent_dim == 32


TUNE = """
study_name: s
n_trials: 3
data: {synthetic: {images: 100, image_dim: 8, text_dim: 8}}
search_space:
  head_type: {type: categorical, choices: [siglip, clip]}
  hidden_dim: {type: categorical, choices: [16, 32]}
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
fixed: {output_dim: 8, batch_size: 32}
"""


def test_tune_config_and_trial_config(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TUNE)
    cfg = load_tune_config(path)
    tc = trial_config(cfg, {"head_type": "clip", "hidden_dim": 16, "learning_rate": 1e-3}, trial_number=4)
    assert isinstance(tc, TrainConfig)
    assert (tc.model.type, tc.model.hidden_dim, tc.model.output_dim) == ("clip", 16, 8)
    assert tc.training.num_epochs == cfg.max_epochs and tc.training.patience == cfg.max_patience
    assert tc.seed != trial_config(cfg, {"head_type": "clip"}, trial_number=5).seed


@pytest.mark.parametrize("patch,expected", [
    ({"search_space": {"head_typ": {"type": "categorical", "choices": ["clip"]}}}, ["search_space.head_typ", "head_type"]),
    ({"search_space": {"learning_rate": {"type": "float", "low": 1.0, "high": 0.1}}}, ["low (1.0) > high (0.1)"]),
    ({"search_space": {"dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": True}}}, ["log scale needs low > 0"]),
    ({"fixed": {"batch_szie": 4}}, ["fixed.batch_szie", "batch_size"]),
    ({"fixed": {"dropout": -1.0}}, ["dropout must be in [0, 1)"]),
    ({"pruner": {"type": "AshaPruner"}}, ["unknown pruner 'AshaPruner'"]),
    ({"n_jobs": 0}, ["n_jobs must be >= 1"]),
])
def test_bad_tune_values(tmp_path, patch, expected):
    raw = yaml.safe_load(TUNE)
    raw.update(patch)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_tune_config(path)
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_tune_config_dump_round_trip(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TUNE)
    cfg = load_tune_config(path)
    dump_yaml(cfg, tmp_path / "again.yaml")
    again = load_tune_config(tmp_path / "again.yaml")
    assert again == cfg
    assert dataclasses.replace(again, n_trials=9).n_trials == 9
    assert isinstance(again, TuneConfig)


# Every section and key of the original's nine training configs (and of the best_config.yaml it wrote).
def test_original_clip_tuning_config_searches_learnable_scale(tmp_path):
    path = tmp_path / "t.yaml"
    raw = yaml.safe_load(TUNE)
    raw["search_space"]["learnable_scale"] = {"type": "categorical", "choices": [True, False]}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_tune_config(path)
    assert "learnable_temp" in cfg.search_space and "learnable_scale" not in cfg.search_space
    assert trial_config(cfg, {"learnable_temp": True, "head_type": "clip"}).loss.learnable_temp is True
    raw["search_space"]["learnable_temp"] = raw["search_space"]["learnable_scale"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="given twice"):
        load_tune_config(path)


@pytest.mark.parametrize("section", ["training", "tuning"])
def test_a_config_without_data_is_refused_not_synthetic(tmp_path, section):
    path = tmp_path / "c.yaml"
    raw = yaml.safe_load(TUNE) if section == "tuning" else yaml.safe_load(ORIGINAL_FULL)
    del raw["data"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        (load_tune_config if section == "tuning" else load_train_config)(path)
    msg = str(e.value)
    assert "no `data:` section" in msg and "synthetic: {}" in msg and "\n" not in msg


def test_best_config_trains_on_the_full_set_whatever_the_extensions(tmp_path):
    """A tuning config naming the original's .pt files, data made by `data split` (.npy): the final run
    reads the full train_* set, not the tuning subset; without a full set it says so."""
    from xclip_jax import data
    from xclip_jax.verdict import full_training_files

    d = tmp_path / "data"
    img, txt, ids = data.synthesize(20, 2, 4, 6, seed=0)
    for name in ("train_tuning", "train"):
        data.write_embedding_set(d, name, img, txt, ids)
    names = {f"train_{p}": f"train_tuning_{p}.{'json' if p == 'metadata' else 'pt'}"
             for p in ("image_embeddings", "text_embeddings", "metadata")}
    names.update({f"val_{p}": f"train_{p}.{'json' if p == 'metadata' else 'pt'}"
                  for p in ("image_embeddings", "text_embeddings", "metadata")})
    cfg = load_tune_config(write(tmp_path, base_data_dir=str(d), data=names))
    changes, warning = full_training_files(cfg)
    assert warning is None and changes == {"train_image_embeddings": "train_image_embeddings.npy",
                                           "train_text_embeddings": "train_text_embeddings.npy",
                                           "train_metadata": "train_metadata.json"}
    for f in d.glob("train_image_embeddings.*"):
        f.unlink()
    changes, warning = full_training_files(cfg)
    assert changes == {} and "tuning subset" in warning and "data split" in warning


@pytest.mark.parametrize("section,keys,meant", [
    ("training", {"num_epochs": 1, "patience": 1}, "did you mean max_epochs: 1 and max_patience: 1?"),
    ("training", {"batch_size": 512}, "did you mean fixed: {batch_size: 512}?"),
    ("model", {"type": "clip"}, "did you mean fixed: {head_type: clip}?"),
])
def test_a_training_section_in_a_tuning_config_names_the_tuning_keys(tmp_path, section, keys, meant):
    """The original's training keys in a tuning config: the tuning config's names for them, not the
    nearest top-level key (``training: unknown key; did you mean 'storage'?``)."""
    raw = yaml.safe_load(TUNE)
    raw[section] = keys
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_tune_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {section}: unknown key in a tuning config") and meant in msg, msg
    assert "storage" not in msg and "\n" not in msg


def test_the_shipped_configs_raise_no_warning():
    """Every combination of the shipped configs' choices runs on their data (the quickstart's synthetic
    set; COCO dims and rows for the default): no queue smaller than a batch, nothing skipped, no
    start-up warning."""
    from xclip_jax import space
    from xclip_jax.study import pruning_warning

    cfg = load_tune_config(ROOT / "configs" / "quickstart.yaml")
    synth = cfg.data.synthetic
    assert space.check_combinations(cfg, synth.images * synth.captions, (synth.image_dim, synth.text_dim)) is None
    assert pruning_warning(cfg) is None
    default = load_tune_config(ROOT / "configs" / "default.yaml")
    assert space.check_combinations(default, 100_000, (1152, 4096)) is None
    assert pruning_warning(default) is None


def test_a_skipped_combination_warning_says_each_reason_once(tmp_path):
    from xclip_jax import space

    raw = yaml.safe_load(TINY_STUDY.format(n_trials=4, dir=tmp_path))["search_space"]
    raw.update(loss_type={"type": "categorical", "choices": ["softmax_infonce", "queue_infonce"]},
               queue_size={"type": "categorical", "choices": [64, 96, 256]})
    cfg = load_tune_config(write(tmp_path, search_space=raw))
    warning = space.check_combinations(cfg, rows=1500, dims=(16, 24))
    assert warning.count("the queue holds less than one batch of negatives") == 1
    assert "queue_size 64 is smaller than training.batch_size 128" in warning
    assert "queue_size 96 is smaller than training.batch_size 128" in warning and "\n" not in warning


def test_baseline_advice_gives_the_change_that_fits_the_config(tmp_path):
    from xclip_jax.tune_config import INIT_LINE, ParamSpace
    from xclip_jax.verdict import baseline_advice

    cfg = load_tune_config(write(tmp_path))  # head_type: siglip, clip, mlp; no init
    change, same_study = baseline_advice(cfg)
    assert INIT_LINE in change and same_study
    searched = dataclasses.replace(cfg, search_space={**cfg.search_space, "init": ParamSpace(choices=("default", "cca"))})
    change, same_study = baseline_advice(searched)
    assert "max_epochs: 8" in change and same_study  # heads start from CCA already: train longer
    no_cca_head = dataclasses.replace(cfg, search_space={**cfg.search_space,
                                                         "head_type": ParamSpace(choices=("clip", "mlp"))})
    change, same_study = baseline_advice(no_cca_head)
    assert "choices: [clip, mlp, linear]" in change and INIT_LINE in change and not same_study


def test_a_typo_in_a_choice_gets_the_nearest_name(tmp_path):
    raw = yaml.safe_load(TUNE)
    raw["search_space"]["head_type"]["choices"] = ["clipp", "siglip"]
    raw["pruner"] = {"type": "SuccessiveHalvingPruner"}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_tune_config(path)
    assert "search_space.head_type: 'clipp' is not a valid value (allowed: siglip, clip" in str(e.value)
    assert str(e.value).endswith("did you mean 'clip'?"), e.value
    raw["search_space"]["head_type"]["choices"] = ["clip"]
    raw["pruner"] = {"type": "MedianPrunr"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="did you mean 'MedianPruner'"):
        load_tune_config(path)


def test_each_study_gets_folders_of_its_own_unless_the_config_names_them(tmp_path, monkeypatch):
    """The original's configs name no folders: run one after another, each study writes into
    optuna_results/<study_name> and checkpoints/<study_name>, so none refuses the next; a config that
    names its folders keeps them, and a study that already owns the shared root stays there."""
    from xclip_jax.runtime import check_owners, claim, with_study_folders

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "t.yaml"
    path.write_text(TUNE)
    cfg = load_tune_config(path)
    assert (cfg.output_dir, cfg.checkpoint_dir) == (None, None)
    a = with_study_folders(cfg)
    b = with_study_folders(dataclasses.replace(cfg, study_name="other"))
    assert (a.output_dir, a.checkpoint_dir) == ("optuna_results/s", "checkpoints/s")
    for study in (a, b):
        folders = {"output_dir": study.output_dir, "checkpoint_dir": study.checkpoint_dir}
        check_owners(folders, study.study_name)  # would refuse a folder that holds the other's files
        for folder in folders.values():
            (tmp_path / folder).mkdir(parents=True)
        claim(folders, study.study_name)
    named = dataclasses.replace(cfg, output_dir="mine", checkpoint_dir="ckpts")
    assert with_study_folders(named) == named
    claim({"output_dir": "optuna_results"}, "old")  # a study begun when the roots were everyone's
    old = with_study_folders(dataclasses.replace(cfg, study_name="old"))
    assert (old.output_dir, old.checkpoint_dir) == ("optuna_results", "checkpoints/old")
    with pytest.raises(Exception, match="can't name a folder; set output_dir"):
        with_study_folders(dataclasses.replace(cfg, study_name="a/b"))


def test_the_command_line_fills_in_the_folders_after_the_flags(tmp_path, monkeypatch):
    from xclip_jax.tune_cli import command_line

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text(TUNE)
    cfg, args, _ = command_line(["t.yaml", "--study-name", "flagged", "--max-epochs", "1"])
    assert (cfg.output_dir, cfg.checkpoint_dir) == ("optuna_results/flagged", "checkpoints/flagged")
    assert args.overrides == {"study_name": "flagged", "max_epochs": 1}
    cfg, _, _ = command_line(["t.yaml", "--output-dir", "here"])
    assert (cfg.output_dir, cfg.checkpoint_dir) == ("here", "checkpoints/s")
