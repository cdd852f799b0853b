"""Typed configs: the original's YAML accepted, round trips, and one clear line per bad value."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from xclip_jax.config import (ConfigError, TrainConfig, TuneConfig, build, dump_yaml, load_train_config,
                              load_tune_config, trial_config)

ROOT = Path(__file__).resolve().parents[1]

ORIGINAL_TRAIN = """
experiment_name: "attention_run"
output_dir: "outputs"
seed: 42
device: "cuda"
base_data_dir: "data"
data:
  train_image_embeddings: "train_image_embeddings.pt"
  train_text_embeddings: "train_text_embeddings.pt"
  train_metadata: "train_metadata.json"
  val_image_embeddings: "val_image_embeddings.pt"
  val_text_embeddings: "val_text_embeddings.pt"
  val_metadata: "val_metadata.json"
model:
  type: attention
  output_dim: 1024
  hidden_dim: 512
  dropout: 0.004132
  num_heads: 16
  num_layers: 1
loss:
  type: softmax_infonce
  temperature: 0.03817
  learnable_scale: false
training:
  batch_size: 4096
  learning_rate: 0.0001106
  weight_decay: 0.000005939
  num_epochs: 50
  patience: 5
  max_grad_norm: 1.0
evaluation:
  top_k: [1, 5, 10, 50]
"""


def test_original_training_yaml_is_accepted_and_round_trips(tmp_path):
    path = tmp_path / "orig.yaml"
    path.write_text(ORIGINAL_TRAIN)
    cfg = load_train_config(path)
    assert cfg.model.type == "attention" and cfg.model.num_heads == 16
    assert cfg.loss.learnable_temp is False and cfg.loss.temperature == pytest.approx(0.03817)
    assert cfg.training.weight_decay == pytest.approx(5.939e-6)
    assert cfg.evaluation.top_k == (1, 5, 10, 50)
    dump_yaml(cfg, tmp_path / "again.yaml")
    assert load_train_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "train").glob("*.yaml")))
def test_shipped_training_configs_load(name):
    load_train_config(ROOT / "configs" / "train" / name)


@pytest.mark.parametrize("name", ["default.yaml", "quickstart.yaml"])
def test_shipped_tuning_configs_load(name):
    cfg = load_tune_config(ROOT / "configs" / name)
    assert cfg.search_space["head_type"].choices == ("siglip", "clip", "attention", "mlp")


def _bad(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("text,expected", [
    ("model:\n  type: clip\n  outptu_dim: 5\n", ["model.outptu_dim", "unknown key", "did you mean 'output_dim'"]),
    ("trainig:\n  batch_size: 5\n", ["trainig", "did you mean 'training'"]),
    ("model:\n  type: transformer\n", ["model", "unknown head type 'transformer'", "siglip"]),
    ("loss:\n  type: triplet\n", ["loss", "unknown loss type 'triplet'", "softmax_infonce"]),
    ("model:\n  dropout: -0.1\n", ["model", "dropout must be in [0, 1)"]),
    ("training:\n  batch_size: big\n", ["training.batch_size", "expected an integer", "'big'"]),
    ("training:\n  learning_rate: [1]\n", ["training.learning_rate", "expected a number"]),
    ("loss:\n  learnable_scale: maybe\n", ["loss.learnable_scale", "expected true or false"]),
    ("model: [1, 2]\n", ["model", "expected a mapping"]),
    ("model:\n  type: clip\n    output_dim: 5\n", ["YAML syntax error at line 3, column", "fix the YAML"]),
])
def test_bad_values_give_one_line_naming_the_key(tmp_path, text, expected):
    msg = _bad(tmp_path, text)
    for part in expected:
        assert part in msg, msg


def test_missing_config_file(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


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


def test_build_is_strict_about_aliases_given_twice():
    with pytest.raises(ConfigError, match="given twice"):
        build(TrainConfig, {"loss": {"learnable_scale": True, "learnable_temp": False}})


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
ORIGINAL_FULL = """
experiment_name: "clip_run"
output_dir: "outputs"
device: "cuda"
seed: 42
base_data_dir: "data"
data:
  train_image_embeddings: "train_image_embeddings.pt"
  train_text_embeddings: "train_text_embeddings.pt"
  train_metadata: "train_metadata.json"
  val_image_embeddings: "val_image_embeddings.pt"
  val_text_embeddings: "val_text_embeddings.pt"
  val_metadata: "val_metadata.json"
  test_image_embeddings: "test_image_embeddings.pt"
  test_text_embeddings: "test_text_embeddings.pt"
  test_metadata: "test_metadata.json"
model: {type: clip, output_dim: 512, hidden_dim: 1024, dropout: 0.1, num_heads: 8, num_layers: 1}
training: {batch_size: 2048, learning_rate: 1.0e-4, weight_decay: 1.0e-4, num_epochs: 50, patience: 5,
           max_grad_norm: 1.0}
loss: {type: softmax_infonce, temperature: 0.07, learnable_scale: true}
evaluation: {top_k: [1, 5, 10], visualization_samples: 500, tsne_perplexity: 25, save_features: true}
"""


def test_every_key_of_the_original_training_configs_is_accepted(tmp_path):
    path = tmp_path / "orig.yaml"
    path.write_text(ORIGINAL_FULL)
    cfg = load_train_config(path)
    assert cfg.device == "cuda" and cfg.loss.learnable_temp is True
    ev = cfg.evaluation
    assert (ev.visualization_samples, ev.tsne_perplexity, ev.save_features) == (500, 25.0, True)
    # without base_data_dir (four of the nine): the default folder
    path.write_text(ORIGINAL_FULL.replace('base_data_dir: "data"\n', ""))
    assert load_train_config(path).base_data_dir == "data"


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


def test_bad_device_and_evaluation_values(tmp_path):
    for text, expected in (("device: tpu\n", "device 'tpu'"), ("evaluation: {tsne_perplexity: 0}\n", "tsne_perplexity"),
                           ("evaluation: {visualization_samples: -1}\n", "visualization_samples")):
        msg = _bad(tmp_path, "data: {synthetic: {}}\n" + text)
        assert expected in msg, msg
