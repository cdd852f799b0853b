"""The memory plan: the formula against the heads' own shapes and XLA's own memory analysis of the
compiled programs, the plan's choices on a simulated card, its refusal, and ``--plan``."""

import dataclasses
import json
import subprocess

import jax
import pytest

from xclip_jax import memory
from xclip_jax.errors import UserError
from xclip_jax.memory import Rows
from xclip_jax.model import param_shapes
from xclip_jax.plan import GIB, make_plan
from xclip_jax.programs import _example_hparams, analysed_bytes
from xclip_jax.spec import ProgramKey
from xclip_jax.step import fresh_states
from xclip_jax.tune_config import load_tune_config

from tests.conftest import env, tune_command, write

HEADS = ("siglip", "clip", "mlp", "attention", "linear")
COCO = (1152, 4096)


def key_of(head, loss="softmax_infonce", dims=(64, 96), out=32, hidden=(48, 40), layers=2, heads=4, queue=512,
           batch=128, dtype="float32"):
    return ProgramKey(head=head, image_dim=dims[0], text_dim=dims[1], output_dim=out,
                      hidden=hidden if head in ("clip", "mlp") else (0, 0),
                      num_layers=layers if head == "attention" else 0, num_heads=heads if head == "attention" else 0,
                      dtype=dtype, loss=loss, queue_size=queue if loss == "queue_infonce" else 0, batch_size=batch)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("head", HEADS)
def test_head_params_are_the_heads_own(head):
    """The driver's count of a member's params (no jax) is what the heads initialise, padded widths and
    sides of different hidden widths included."""
    key = key_of(head)
    assert memory.head_params(key) == sum(x.size for x in jax.tree.leaves(param_shapes(key))) + 2


@pytest.mark.parametrize("head,loss", [("mlp", "queue_infonce"), ("attention", "sigmoid_infonce")])
def test_state_bytes_are_the_fresh_states(head, loss):
    """Params, AdamW's moments and the queue of 3 members: within a few hundred bytes (counters, keys,
    the members' values) of the state the program is given."""
    key = key_of(head, loss)
    states = jax.eval_shape(lambda: fresh_states(key, _example_hparams(3)))
    held = _bytes((states.params, states.opt_state, states.queue))
    assert abs(memory.state_bytes(key, 3) - held) < 200


# Each head, each loss, one and several members, small and COCO-like dims (the default space's
# largest attention program at the GPU's padding; an mlp with the largest queue, four members).
# The whole grid: scripts/plan_check.py.
CASES = [
    (key_of("siglip", "sigmoid_infonce"), 1, Rows(2000, 400), Rows(500, 100)),
    (key_of("clip"), 4, Rows(2000, 400), Rows(500, 100)),
    (key_of("linear", "queue_infonce"), 2, Rows(2000, 2000), Rows(500, 500)),
    (key_of("attention", "softmax_infonce", dims=COCO, out=1024, layers=3, heads=16, batch=8192), 1,
     Rows(100_000, 20_000), Rows(25_000, 5000)),
    (key_of("mlp", "queue_infonce", dims=COCO, out=1024, hidden=(2048, 2048), queue=32768, batch=8192), 4,
     Rows(100_000, 20_000), Rows(25_000, 5000)),
]


@pytest.mark.parametrize("key,members,train,val", CASES, ids=lambda c: getattr(c, "head", None))
def test_the_formula_holds_against_xla(key, members, train, val):
    xla = analysed_bytes(key, members, train, val)
    epoch, evaluation = xla["epoch"], xla["eval"]
    planned_epoch, planned_eval = memory.epoch_bytes(key, members, train), memory.eval_bytes(key, members, val)
    assert 0.8 <= planned_epoch / epoch <= 1.5, (planned_epoch, epoch)
    assert 0.8 <= planned_eval / evaluation <= 1.5, (planned_eval, evaluation)


def default_on_a_gpu(**patch):
    cfg = load_tune_config("configs/default.yaml")
    return dataclasses.replace(cfg, padding="max", batch_trials=1, **patch)


TRAIN, VAL = Rows(100_000, 20_000), Rows(25_000, 5000)


def test_the_default_study_fits_an_80_gb_card():
    """configs/default.yaml at COCO dims on an 80 GiB card, three runners: every program fits a third,
    padded to the space's maximum."""
    plan = make_plan(default_on_a_gpu(), COCO, TRAIN, VAL, 80 * GIB)
    assert plan.sharing == 3 and plan.runner_bytes == 80 * GIB // 3 and plan.padding == "max"
    assert plan.entries and all(e.bytes <= 80 * GIB // 3 for e in plan.entries)
    assert {e.key.head for e in plan.entries} == {"siglip", "clip", "attention", "mlp"}


def test_a_choice_no_runner_can_hold_is_refused_in_one_line():
    """On the original's 24 GiB card with three runners the attention head with the largest queue and
    batch does not fit a third even at exact widths: refused before anything, naming it and the fixes."""
    with pytest.raises(UserError) as e:
        make_plan(default_on_a_gpu(), COCO, TRAIN, VAL, 24 * GIB)
    line = str(e.value)
    assert "\n" not in line and "head_type attention with loss_type queue_infonce, batch_size 8192" in line
    assert "8.00 GiB of the 24.0 GiB card" in line and "fewer n_jobs" in line and "smaller batch_size" in line


def test_members_shrink_to_fit():
    """batch_trials 4 on a card that holds fewer of the larger programs: each program gets the most
    members (at most 4) that fit a runner's share."""
    cfg = dataclasses.replace(default_on_a_gpu(), batch_trials=4, n_jobs=1)
    roomy = make_plan(cfg, COCO, TRAIN, VAL, None)
    assert {e.members for e in roomy.entries} == {4} and roomy.padding == "max"
    tight = make_plan(cfg, COCO, TRAIN, VAL, 24 * GIB)
    assert all(e.bytes <= 24 * GIB for e in tight.entries)
    members = {e.key: e.members for e in tight.entries}
    assert len(set(members.values())) > 1 and min(members.values()) < 4
    for e in tight.entries:  # one more member would not fit
        assert e.members == 4 or memory.runner_bytes(e.key, e.members + 1, TRAIN, VAL) > 24 * GIB


def test_plan_flag_prints_writes_and_trains_nothing(tmp_path):
    cfg_path = write(tmp_path, n_jobs=2, batch_trials=2)
    done = subprocess.run(tune_command(cfg_path, "--plan", "--device-memory-gb", "4"), capture_output=True, text=True,
                          env=env(tmp_path), timeout=300)  # the driver's command: it imports no jax
    assert done.returncode == 0, done.stderr
    assert "memory plan: 4.00 GiB card / 2 runners = 2.00 GiB each" in done.stdout
    out = next(tmp_path.rglob("plan.json"))
    plan = json.loads(out.read_text())
    assert plan["device_memory_bytes"] == 4 * GIB and plan["n_jobs"] == 2
    entry = plan["entries"][0]
    assert set(entry) >= {"head", "loss", "batch_size", "padding", "members", "bytes", "rows", "key"}
    assert entry["members"] == 2 and entry["key"]["head"] == entry["head"]
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("trial_*.log"))
