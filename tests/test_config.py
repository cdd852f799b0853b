"""Typed configs: the original's YAML accepted, round trips, and one clear line per bad value."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from xclip_jax.config import (
    ConfigError,
    TrainConfig,
    build,
    dump_yaml,
    load_train_config,
)

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
    # a typo of a name gets the nearest one, as a typo of a key does
    ("model:\n  type: clipp\n", ["model", "unknown head type 'clipp'", "did you mean 'clip'?"]),
    ("loss:\n  sigmoid_normalize: bach\n", ["loss", "did you mean 'batch'?"]),
    ("training:\n  dtype: bfloat61\n", ["training", "did you mean 'bfloat16'?"]),
])
def test_bad_values_give_one_line_naming_the_key(tmp_path, text, expected):
    msg = _bad(tmp_path, text)
    for part in expected:
        assert part in msg, msg


def test_missing_config_file(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_build_is_strict_about_aliases_given_twice():
    with pytest.raises(ConfigError, match="given twice"):
        build(TrainConfig, {"loss": {"learnable_scale": True, "learnable_temp": False}})


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


def test_bad_device_and_evaluation_values(tmp_path):
    for text, expected in (("device: tpu\n", "device 'tpu'"), ("evaluation: {tsne_perplexity: 0}\n", "tsne_perplexity"),
                           ("evaluation: {visualization_samples: -1}\n", "visualization_samples")):
        msg = _bad(tmp_path, "data: {synthetic: {}}\n" + text)
        assert expected in msg, msg
    msg = _bad(tmp_path, "data: {synthetic: {fold: 1.5}}\n")
    assert "fold must be between 0 and 1" in msg, msg


# One non-default value for every field of the three spec sections, with the head and loss under
# which that field matters (a field read only by the attention head is checked on an attention head).
FIELD_CASES = {
    ("model", "type"): ("mlp", {}), ("model", "output_dim"): (12, {}), ("model", "hidden_dim"): (20, {}),
    ("model", "num_heads"): (2, {"model": {"type": "attention"}}),
    ("model", "num_layers"): (2, {"model": {"type": "attention"}}),
    ("loss", "type"): ("sigmoid_infonce", {}),
    ("loss", "learnable_temp"): (True, {}),
    ("loss", "learnable_bias"): (False, {"loss": {"type": "sigmoid_infonce"}}),
    ("loss", "sigmoid_normalize"): ("batch", {"loss": {"type": "sigmoid_infonce"}}),
    ("loss", "queue_size"): (48, {"loss": {"type": "queue_infonce"}}),
    ("loss", "mask_batch_duplicates"): (False, {"loss": {"type": "queue_infonce"}}),
    ("training", "batch_size"): (16, {}), ("training", "max_grad_norm"): (0.25, {}),
    ("training", "dtype"): ("bfloat16", {}),
    # data: they travel in the train state, or steer the fit loop
    ("model", "dropout"): (0.3, {}), ("loss", "temperature"): (0.02, {}),
    ("model", "init"): ("cca", {"model": {"type": "linear"}}),
    ("training", "learning_rate"): (0.005, {}), ("training", "weight_decay"): (0.02, {}),
    ("training", "num_epochs"): (3, {}), ("training", "patience"): (2, {}),
}


def test_field_cases_cover_every_spec_field():
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec

    fields = {(section, f.name) for section, spec in (("model", HeadSpec), ("loss", LossSpec),
                                                       ("training", TrainingSpec)) for f in dataclasses.fields(spec)}
    assert set(FIELD_CASES) == fields


# Where each data field lands in a member's HParams, as the value the config gives.
HP_FIELDS = {"dropout": "dropout", "temperature": "temperature", "learning_rate": "learning_rate",
             "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "learnable_temp": "learnable_temp",
             "learnable_bias": "learnable_bias", "mask_batch_duplicates": "mask_batch_duplicates",
             "num_heads": "num_heads", "output_dim": "output_dim", "hidden_dim": "hidden_image",
             "num_layers": "num_layers", "queue_size": "queue_size"}


@pytest.mark.parametrize("section,key", list(FIELD_CASES))
def test_every_config_field_reaches_the_program_or_the_state(tmp_path, monkeypatch, section, key):
    """Set each field through YAML and watch it arrive: a static field changes the program key (and
    the compiled epoch), a width the exact key and the member's HParams (padded to a larger bucket,
    only the HParams), a data field the HParams alone, a fit-loop field the fit loop's arguments."""
    import jax
    import numpy as np

    from xclip_jax import data, train
    from xclip_jax.baselines import with_head_init
    from xclip_jax.padding import WIDTH_FIELDS, Buckets, program_key
    from xclip_jax.spec import STATIC_FIELDS, RunSpec
    from xclip_jax.step import create_train_state, run_epochs, to_device

    value, base = FIELD_CASES[(section, key)]

    def load(extra):
        raw = {"data": {"synthetic": {"images": 40, "captions": 2, "image_dim": 8, "text_dim": 12, "val_images": 8,
                                      "test_images": 4}},
               "model": {"type": "clip", "output_dim": 8, "hidden_dim": 8, "dropout": 0.1, "num_heads": 4},
               "loss": {"queue_size": 32}, "training": {"batch_size": 8}}
        for patch in (base, extra):
            for sec, values in patch.items():
                raw[sec].update(values)
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_train_config(path)

    default_cfg, cfg = load({}), load({section: {key: value}})
    assert getattr(getattr(cfg, section), key) == value
    specs = [RunSpec.of(c, 8, 12) for c in (default_cfg, cfg)]
    keys = [program_key(s) for s in specs]
    if key in STATIC_FIELDS[type(getattr(cfg, section)).__name__]:  # traced, not run: abstract states are enough
        assert keys[0] != keys[1]
        d = to_device(data.synthetic_splits(40, 2, 8, 12, val_images=8, test_images=4)["train"])
        states = [jax.eval_shape(lambda s=s: jax.tree.map(lambda x: x[None], create_train_state(s, seed=0)))
                  for s in specs]
        hlo = [run_epochs.lower(st, d, np.array([True])).as_text() for st in states]
        assert hlo[0] != hlo[1], f"{section}.{key} does not change the compiled program"
        return
    if key in (*WIDTH_FIELDS, "num_heads"):  # its own program unpadded; in a bucket that holds both, the same one
        # (a study's attention programs draw dropout for the most heads its space has: one key for all)
        assert keys[0] != keys[1]
        wide = Buckets.of("max", {key: (getattr(getattr(default_cfg, section), key), value)})
        assert program_key(specs[0], wide) == program_key(specs[1], wide)
    else:
        assert keys[0] == keys[1]  # data and fit-loop fields share the program...
    states = [create_train_state(s, seed=0) for s in specs]
    if key in ("num_epochs", "patience"):  # ...and these steer the fit loop
        seen = {}

        def fake_fit(*args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop here")

        monkeypatch.setattr(train, "fit", fake_fit)
        with pytest.raises(RuntimeError, match="stop here"):
            train.run_training(cfg, tmp_path / "out", progress=False)
        assert seen[key] == value
        return
    if key == "init":  # it reaches the state's starting params (from the training set's CCA)
        starts = [with_head_init(st, [c.model], data.synthetic_splits(40, 2, 8, 12, val_images=8,
                                                                      test_images=4)["train"])
                  for st, c in zip(states, (default_cfg, cfg))]
        kernel = [np.asarray(st.params["image"]["Dense_0"]["kernel"]) for st in starts]
        assert np.array_equal(kernel[0], np.asarray(states[0].params["image"]["Dense_0"]["kernel"]))
        assert not np.allclose(kernel[0], kernel[1])
        return
    if key == "sigmoid_normalize":
        got = [bool(st.hp.sigmoid_per_batch) for st in states]
        assert got == [False, True]
        return
    got = [jax.device_get(getattr(st.hp, HP_FIELDS[key])).item() for st in states]
    assert got[1] == pytest.approx(value, rel=1e-6) and got[0] != pytest.approx(value, rel=1e-6)
    if key == "temperature":  # and the loss params start from it
        assert float(np.exp(-states[1].params["loss"]["log_scale"])) == pytest.approx(value, rel=1e-6)


def test_the_settings_line_shows_every_resolved_setting_its_head_and_loss_use():
    """What a config with the original's keys only resolves to (the defaults filled in, hidden_dim as
    half of each input dim), and no field that its head or loss ignores."""
    from xclip_jax.config import settings_line

    cfg = build(TrainConfig, {"data": {"synthetic": {}}, "model": {"type": "clip"},
                              "training": {"num_epochs": 1, "patience": 1}})
    line = settings_line(cfg, 1152, 4096)
    assert line.startswith("settings: model clip (output_dim 512, hidden_dim 576/2048 (half of each input dim), "
                           "dropout 0.1); loss softmax_infonce (temperature 0.07, learnable_temp false); training "
                           "batch_size 2048, learning_rate 0.0001, weight_decay 0.0001, num_epochs 1, patience 1"), line
    assert "num_heads" not in line and "queue_size" not in line and "learnable_bias" not in line and "\n" not in line
    cfg = build(TrainConfig, {"data": {"synthetic": {}}, "model": {"type": "siglip", "init": "cca"},
                              "loss": {"type": "sigmoid_infonce"}})
    line = settings_line(cfg, 8, 8)
    assert "init cca" in line and "learnable_bias true" in line and "hidden_dim" not in line


def test_a_yaml_error_names_the_file_once(tmp_path):
    msg = _bad(tmp_path, "model:\n  type: clip\n    output_dim: 5\n")
    assert msg.count("bad.yaml") == 1 and msg.startswith(f"{tmp_path / 'bad.yaml'}: YAML syntax error"), msg


def test_a_tuning_config_given_to_train_says_which_command_runs_it(tmp_path):
    msg = _bad(tmp_path, "study_name: s\nn_trials: 3\ndata: {synthetic: {}}\nsearch_space: {}\n")
    assert "a tuning config (it has study_name, search_space, n_trials)" in msg, msg
    assert f"python -m xclip_jax.tune {tmp_path / 'bad.yaml'}" in msg and "unknown key" not in msg


def test_the_tuning_keys_that_train_recognises_are_the_tuning_configs():
    from xclip_jax.config import TUNING_KEYS
    from xclip_jax.tune_config import TuneConfig

    tuning, training = ({f.name for f in dataclasses.fields(c)} for c in (TuneConfig, TrainConfig))
    assert set(TUNING_KEYS) <= tuning - training
