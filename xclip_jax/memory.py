"""What one runner needs of its device's memory for a program: a formula per head and loss over the
program's static shapes (a :class:`~xclip_jax.spec.ProgramKey`), its member count and the data's
rows. Plain Python (no jax): the tuning driver plans a study's memory with it before any trial.

A runner holds, for the life of a trial: the resident training and validation sets, and each
member's params, AdamW's two moments and its queue (the state); one epoch program or one evaluation
runs at a time on top, each with its own temporaries (a scan step's activations, gradients and
optimizer update, the loss's batch x batch matrices, the shuffle; the evaluation's embeddings of the
set and its similarity blocks). The temporaries' coefficients were fitted to XLA's own
``memory_analysis()`` of the compiled programs on a CPU, at small and COCO-like dims, every head and
loss, one and four members (the tests hold the formula to within 0.8-1.5x of it).
"""

from __future__ import annotations

import dataclasses

from xclip_jax.spec import ProgramKey

F32 = 4
ENCODE_CHUNK_ROWS = 8192  # rows a head encodes at a time in evaluation (encode.ENCODE_CHUNK_ROWS)
RANK_CHUNK = 1024  # images per similarity block in evaluation (metrics.DEFAULT_CHUNK_SIZE)

# The coefficients of the temporaries (float32 words), fitted to XLA's analysis of the compiled epoch
# and validation programs of 50 keys (every head and loss at small dims, every head at mid and COCO-like
# dims, one and four members; scripts/plan_check.py prints the formula against it) and raised about a
# tenth, so that a plan errs on the side of room. A training step's, per member: the loss's
# batch x batch (queue: batch x (batch + slots)) matrices, the activations one example keeps for the
# gradient (an attention block's apart, per layer and input width), the gradient's and AdamW's copies
# of the params, and the epoch's shuffle per training row.
LOSS_MATRICES = {"softmax_infonce": 3.1, "sigmoid_infonce": 4.4, "queue_infonce": 3.6}
ACTIVATIONS, ATTENTION_LAYER, PARAM_COPIES, SHUFFLE = 2.0, 6.3, 1.5, 12.0
# The evaluation's, per member: its embeddings of the set, a [chunk, rows] block of similarities (1.6
# times that when the members are mapped), a chunk of rows through the heads.
EVAL_EMBEDDINGS, EVAL_BLOCKS, EVAL_ENCODE = 1.1, 1.0, 0.11


@dataclasses.dataclass(frozen=True)
class Rows:
    """A set's sizes: its caption rows and its unique images."""

    rows: int
    images: int


def head_params(key: ProgramKey) -> int:
    """Float32 params of one member's two heads at the key's (padded) widths, and the loss's two."""
    out, total = key.output_dim, 2
    for side, in_dim in enumerate((key.image_dim, key.text_dim)):
        if key.head == "siglip":
            total += 2 * in_dim + in_dim * out
        elif key.head in ("clip", "mlp"):
            hidden = key.hidden[side]
            total += in_dim * hidden + hidden + hidden * out + out + (2 * out if key.head == "mlp" else 0)
        elif key.head == "attention":
            total += key.num_layers * (2 * in_dim * in_dim + 4 * in_dim) + in_dim * out + 3 * out
        else:  # linear
            total += in_dim * out + out
    return total


def state_bytes(key: ProgramKey, members: int) -> int:
    """The members' train state: params, AdamW's two moments, the queue (embeddings, ids, flags)."""
    queue = key.queue_size * (key.output_dim * F32 + F32 + 1) if key.loss == "queue_infonce" else 0
    return members * (3 * head_params(key) * F32 + queue)


def data_bytes(key: ProgramKey, data: Rows) -> int:
    """A set resident on the device: its images once, its captions, each caption's image index."""
    return data.images * key.image_dim * F32 + data.rows * (key.text_dim * F32 + F32)


def _activations(key: ProgramKey) -> float:
    """Float words one example keeps through a step of one member's two heads (weighted)."""
    width = 0.0
    for side, in_dim in enumerate((key.image_dim, key.text_dim)):
        width += ACTIVATIONS * (in_dim + 2 * key.output_dim)
        if key.head in ("clip", "mlp"):
            width += ACTIVATIONS * 3 * key.hidden[side]
        elif key.head == "siglip":
            width += ACTIVATIONS * 2 * in_dim
        elif key.head == "attention":
            width += ATTENTION_LAYER * key.num_layers * in_dim
    return width


def _scale(key: ProgramKey) -> float:
    return 0.5 if key.dtype == "bfloat16" else 1.0


def epoch_temp_bytes(key: ProgramKey, members: int, train: Rows) -> int:
    """The epoch program's temporaries (beyond its arguments)."""
    b = key.batch_size
    negatives = b + (key.queue_size if key.loss == "queue_infonce" else 0)
    step = (LOSS_MATRICES[key.loss] * b * negatives + _scale(key) * b * _activations(key)
            + PARAM_COPIES * head_params(key))
    return int(members * (step + SHUFFLE * train.rows) * F32)


def _padded_rows(n: int) -> int:
    """Rows of the copy the evaluation pads a set's ``n`` rows to (whole chunks; none when they are)."""
    chunk = min(ENCODE_CHUNK_ROWS, n)
    whole = -(-n // chunk) * chunk
    return whole if whole != n else 0


def eval_temp_bytes(key: ProgramKey, members: int, val: Rows) -> int:
    """The evaluation's temporaries: the set padded to whole chunks (once), and per member its
    embeddings of the set, a chunk of rows through the heads and a block of similarities at a time."""
    padded = _padded_rows(val.images) * key.image_dim + _padded_rows(val.rows) * key.text_dim
    chunk = min(ENCODE_CHUNK_ROWS, max(val.rows, val.images))
    blocks = EVAL_BLOCKS * (1.6 if members > 1 else 1) * min(RANK_CHUNK, val.images) * val.rows
    member = (EVAL_EMBEDDINGS * (val.rows + val.images) * key.output_dim + blocks
              + EVAL_ENCODE * _scale(key) * chunk * _activations(key) / ACTIVATIONS)
    return int((padded + members * member) * F32)


def epoch_bytes(key: ProgramKey, members: int, train: Rows) -> int:
    """The epoch program's arguments (the training set, the state) and temporaries: XLA's figure."""
    return data_bytes(key, train) + state_bytes(key, members) + epoch_temp_bytes(key, members, train)


def eval_bytes(key: ProgramKey, members: int, val: Rows) -> int:
    """The validation's arguments (the set, the params) and temporaries: XLA's figure."""
    return data_bytes(key, val) + members * head_params(key) * F32 + eval_temp_bytes(key, members, val)


def runner_bytes(key: ProgramKey, members: int, train: Rows, val: Rows) -> int:
    """One runner's need for a bundle of ``members`` of ``key``: both sets and the state resident,
    and the larger of the epoch's and the evaluation's temporaries on top."""
    resident = data_bytes(key, train) + data_bytes(key, val) + state_bytes(key, members)
    return resident + max(epoch_temp_bytes(key, members, train), eval_temp_bytes(key, members, val))
