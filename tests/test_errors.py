"""Bad input through the CLIs: one line naming the thing and the fix, exit status 2, no traceback."""

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
import yaml

from tests.conftest import TUNE, run_cli
from xclip_jax import data, report, train, tune
from xclip_jax.errors import UserError
from xclip_jax.runtime import check_owners, claim
from xclip_jax.storage import make_storage


def claim_checkpoint_dir(folder, study_name):
    check_owners({"checkpoint_dir": folder}, study_name)
    claim({"checkpoint_dir": folder}, study_name)


def train_yaml(tmp_path, **patch):
    raw = {"experiment_name": "e", "output_dir": str(tmp_path / "out"), "base_data_dir": str(tmp_path / "d"),
           "data": {f"{s}_{p}": f"{s}_{p}.npy" if p != "metadata" else f"{s}_metadata.json"
                    for s in ("train", "val") for p in ("image_embeddings", "text_embeddings", "metadata")},
           "model": {"type": "clip", "output_dim": 8, "hidden_dim": 8},
           "training": {"batch_size": 16, "num_epochs": 1}}
    for key, value in patch.items():
        raw.setdefault(key, {})
        if isinstance(value, dict) and isinstance(raw[key], dict):
            raw[key].update(value)
        else:
            raw[key] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for split, n, first_id in (("train", 40, 0), ("val", 20, 1000)):
        img, txt, ids = data.synthesize(n // 5, 5, 8, 12, seed=1)
        data.write_embedding_set(d, split, img, txt, ids + first_id)
    return d


def test_syntax_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  type: clip\n   output_dim: 4\n")
    err = run_cli(train.main, [str(p)], capsys)
    assert "line 3" in err and "bad.yaml" in err


def test_unknown_key_and_types(tmp_path, files, capsys):
    assert "did you mean 'dropout'" in run_cli(train.main, [str(train_yaml(tmp_path, model={"dropuot": 0.1}))], capsys)
    assert "expected an integer" in run_cli(train.main, [str(train_yaml(tmp_path, training={"batch_size": "x"}))], capsys)
    assert "dropout must be in [0, 1)" in run_cli(train.main, [str(train_yaml(tmp_path, model={"dropout": -0.2}))], capsys)
    assert "unknown head type 'vit'" in run_cli(train.main, [str(train_yaml(tmp_path, model={"type": "vit"}))], capsys)
    assert "unknown loss type 'nce'" in run_cli(train.main, [str(train_yaml(tmp_path, loss={"type": "nce"}))], capsys)


def test_batch_larger_than_data(tmp_path, files, capsys):
    err = run_cli(train.main, [str(train_yaml(tmp_path, training={"batch_size": 64}))], capsys)
    assert "batch_size=64" in err and "40 rows" in err


def test_missing_file(tmp_path, files, capsys):
    (files / "val_text_embeddings.npy").unlink()
    err = run_cli(train.main, [str(train_yaml(tmp_path))], capsys)
    assert "val_text_embeddings" in err


def test_row_mismatch(tmp_path, files, capsys):
    np.save(files / "train_text_embeddings.npy", np.random.default_rng(0).normal(size=(39, 12)).astype(np.float32))
    err = run_cli(train.main, [str(train_yaml(tmp_path))], capsys)
    assert "train_text_embeddings.npy" in err and "39" in err and "40" in err


def test_nan_rows(tmp_path, files, capsys):
    x = np.load(files / "train_image_embeddings.npy")
    x[7, 2] = np.nan
    np.save(files / "train_image_embeddings.npy", x)
    err = run_cli(train.main, [str(train_yaml(tmp_path))], capsys)
    assert "train_image_embeddings.npy" in err and ("NaN" in err or "non-finite" in err)


def test_ids_wrong_length(tmp_path, files, capsys):
    meta = json.loads((files / "val_metadata.json").read_text())
    (files / "val_metadata.json").write_text(json.dumps({"image_ids": meta["image_ids"][:-3]}))
    err = run_cli(train.main, [str(train_yaml(tmp_path))], capsys)
    assert "val_metadata.json" in err and "17" in err


def tune_yaml(tmp_path, **patch):
    raw = yaml.safe_load(TUNE.format(n_trials=1, dir=tmp_path))
    raw.update(patch)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_storage_unreachable_never_shows_the_password(tmp_path, capsys):
    path = tune_yaml(tmp_path, storage="postgresql+psycopg://nobody:S3CRET-PW@127.0.0.1:1/none")
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "127.0.0.1:1" in err and "unreachable" in err
    assert "S3CRET-PW" not in err and "nobody:***@" in err
    err = run_cli(report.main, ["postgresql+psycopg://nobody:S3CRET-PW@127.0.0.1:1/none", "s"], capsys)
    assert "S3CRET-PW" not in err and "127.0.0.1:1" in err


def test_missing_postgres_driver_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails as if not installed

    with pytest.raises(UserError) as e:
        make_storage("postgresql+psycopg://alice:PW@127.0.0.1:5432/test")
    msg = str(e.value)
    assert "pip install 'psycopg[binary]>=3.1'" in msg and "unreachable" not in msg and "PW@" not in msg


def test_a_typo_in_the_storage_scheme_gets_the_nearest_one(tmp_path, capsys):
    """Not "unreachable … check that the server runs": the scheme is misspelt, and nothing is created."""
    err = run_cli(tune.main, [str(tune_yaml(tmp_path, storage=f"sqllite:///{tmp_path}/s.db")), "--no-progress"], capsys)
    assert f"unknown database scheme 'sqllite'; did you mean sqlite:///{tmp_path}/s.db?" in err, err
    assert "unreachable" not in err and not (tmp_path / "s.db").exists()
    with pytest.raises(UserError) as e:
        make_storage("postgress://alice:PW@host/db")
    assert "did you mean postgresql://alice:***@host/db?" in str(e.value) and "PW" not in str(e.value)


def test_storage_url_takes_secrets_from_the_environment(tmp_path, monkeypatch):

    monkeypatch.setenv("XCLIP_TEST_DB", str(tmp_path / "from_env.db"))
    make_storage("sqlite:///${XCLIP_TEST_DB}")
    assert (tmp_path / "from_env.db").is_file()
    with pytest.raises(UserError, match="XCLIP_NOT_SET is not set"):
        make_storage("postgresql+psycopg://alice:${XCLIP_NOT_SET}@host/db")


@pytest.mark.parametrize("module", ["tune", "train", "evaluate", "report", "data"])
def test_every_help_shows_debug(module):
    out = subprocess.run([sys.executable, "-m", f"xclip_jax.{module}", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--debug" in out.stdout


def test_tune_config_as_the_original_flag_or_the_default(tmp_path, capsys, monkeypatch):
    path = tune_yaml(tmp_path, storage="postgresql+psycopg://nobody@127.0.0.1:1/none")
    err = run_cli(tune.main, ["--config", str(path), "--no-progress"], capsys)  # the config was read
    assert "127.0.0.1:1" in err
    monkeypatch.chdir(tmp_path)
    err = run_cli(tune.main, ["--no-progress"], capsys)
    assert "no config given" in err and "configs/default.yaml" in err
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text(path.read_text())
    err = run_cli(tune.main, ["--no-progress"], capsys)  # the default was read
    assert "127.0.0.1:1" in err
    err = run_cli(tune.main, [str(path), "--config", "other.yaml"], capsys)
    assert "two configs" in err


def test_changed_search_space_via_cli(tmp_path, capsys):
    path = tune_yaml(tmp_path)
    optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    from xclip_jax import space
    from xclip_jax.tune_config import load_tune_config

    cfg = load_tune_config(path)
    s = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    space.store_space(s, cfg)
    s.add_trial(optuna.trial.create_trial(params={"head_type": "clip"}, value=0.5, distributions={
        "head_type": optuna.distributions.CategoricalDistribution(["siglip", "clip", "mlp"])}))
    raw = yaml.safe_load(path.read_text())
    raw["search_space"]["head_type"]["choices"] = ["attention"]
    path.write_text(yaml.safe_dump(raw))
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "head_type" in err and "attention" in err and "new study_name" in err


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tune_yaml(tmp_path, output_dir=str(blocker / "results"))
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "not writable" in err and "results" in err
    assert not list(tmp_path.glob("checkpoints/*"))


def test_tune_batch_choice_larger_than_data(tmp_path, capsys):
    raw = yaml.safe_load(TUNE.format(n_trials=1, dir=tmp_path))
    raw["search_space"]["batch_size"]["choices"] = [64, 4096]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "4096" in err and "1500 rows" in err
    # nothing was stored: fixing the config and rerunning starts clean, not with "search space changed"
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/study.db") == []
    assert not (tmp_path / "checkpoints" / ".study_name").exists()


def test_debug_shows_the_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {type: vit}\n")
    out = subprocess.run([sys.executable, "-m", "xclip_jax.train", str(p), "--debug"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "xclip_jax.train", str(p)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_full_disk_in_any_command_is_one_line(capsys):
    import errno

    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/history.json")

    err = run_cli(main, [], capsys)
    assert err.startswith("error: disk full writing /data/out/history.json") and "--resume" in err


def test_full_disk_worded_by_a_library_is_one_line(capsys):
    def main(argv):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write: No space left on device')

    err = run_cli(main, [], capsys)
    assert err.startswith("error: disk full writing a file (No space left on device)")


def test_second_study_in_the_same_checkpoint_dir_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"  # the tiny config's checkpoint_dir
    ckpt.mkdir()
    claim_checkpoint_dir(ckpt, "tiny")
    claim_checkpoint_dir(ckpt, "tiny")  # the same study (a resume, another machine) is welcome
    err = run_cli(tune.main, [str(tune_yaml(tmp_path)), "--study-name", "other", "--no-progress"], capsys)
    assert "study 'tiny'" in err and "'other'" in err and "--checkpoint-dir" in err
    # its own checkpoint_dir, but the first study's output_dir (its best_config.yaml): refused too
    results = tmp_path / "results"  # the tiny config's output_dir
    results.mkdir(exist_ok=True)
    (results / "best_results.json").write_text(json.dumps({"study_name": "tiny"}))
    err = run_cli(tune.main, [str(tune_yaml(tmp_path)), "--study-name", "other", "--checkpoint-dir",
                              str(tmp_path / "other_ckpt"), "--no-progress"], capsys)
    assert "output_dir" in err and "study 'tiny'" in err and "--output-dir" in err and "--checkpoint-dir" not in err
    assert not (tmp_path / "other_ckpt" / ".study_name").exists()
    # a folder from before the marker: the owner is read from a trial's cfg.yaml
    old = tmp_path / "old"
    (old / "00000").mkdir(parents=True)
    (old / "00000" / "cfg.yaml").write_text("# trial 0 of study legacy\nseed: 1\n")
    with pytest.raises(UserError, match="study 'legacy'"):
        claim_checkpoint_dir(old, "tiny")
    claim_checkpoint_dir(old, "legacy")
    assert (old / ".study_name").read_text().strip() == "legacy"


def test_a_bad_data_path_creates_nothing(tmp_path, capsys):
    """Tuning and training refuse a missing embedding file before they create anything: no SQLite
    file, no output or checkpoint folder."""
    names = {f"{s}_{p}": f"{s}_{p}.npy" if p != "metadata" else f"{s}_metadata.json"
             for s in ("train", "val") for p in ("image_embeddings", "text_embeddings", "metadata")}
    path = tune_yaml(tmp_path, base_data_dir=str(tmp_path / "no_such_dir"), data=names)
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "train_image_embeddings" in err and "no_such_dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.yaml"]
    err = run_cli(train.main, [str(train_yaml(tmp_path))], capsys)  # its base_data_dir d does not exist
    assert "train_image_embeddings" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.yaml", "tune.yaml"]
