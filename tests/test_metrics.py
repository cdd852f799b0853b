"""Retrieval metrics against a float64 brute-force reference on random data."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from xclip_jax import metrics
from xclip_jax.metrics import format_table, retrieval_metrics, retrieval_metrics_indexed


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_set(seed, num_images, dim=16, max_captions=7, noise=1.5):
    """Unique images, 1..max_captions noisy captions each, captions in shuffled order."""
    rng = np.random.default_rng(seed)
    images = _normalise(rng.standard_normal((num_images, dim))).astype(np.float32)
    counts = rng.integers(1, max_captions + 1, num_images)
    text_image = rng.permutation(np.repeat(np.arange(num_images), counts))
    texts = images[text_image] + noise * rng.standard_normal((text_image.size, dim)) / np.sqrt(dim)
    return images, _normalise(texts).astype(np.float32), text_image


def reference_ranks(images, texts, text_image):
    """1-based ranks from a full float64 cosine-similarity matrix, sorted with argsort, one query at a time."""
    sim = _normalise(images.astype(np.float64)) @ _normalise(texts.astype(np.float64)).T
    num_images, num_texts = sim.shape
    i2t = np.empty(num_images, dtype=np.int64)
    for i in range(num_images):
        order = np.argsort(-sim[i], kind="stable")
        for position, t in enumerate(order):
            if text_image[t] == i:
                i2t[i] = position + 1
                break
    t2i = np.empty(num_texts, dtype=np.int64)
    for t in range(num_texts):
        order = np.argsort(-sim[:, t], kind="stable")
        t2i[t] = int(np.nonzero(order == text_image[t])[0][0]) + 1
    return i2t, t2i


def reference_metrics(images, texts, text_image, ks):
    i2t, t2i = reference_ranks(images, texts, text_image)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_recall@{k}"] = sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_median_rank"] = float(np.median(ranks))
    recalls = [out[f"{name}_recall@{k}"] for name in ("i2t", "t2i") for k in ks]
    out["mean_recall"] = sum(recalls) / len(recalls)
    out["r1"] = (np.mean(i2t == 1) + np.mean(t2i == 1)) / 2
    return out


def assert_metrics_equal(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_reference_data_is_not_trivial():
    # The comparisons below only mean something if ranks vary in both directions.
    i2t, t2i = reference_ranks(*make_set(0, 40))
    assert 0.1 < np.mean(i2t == 1) < 0.95
    assert 0.1 < np.mean(t2i == 1) < 0.95
    assert t2i.max() > 5 and i2t.max() > 5


@pytest.mark.parametrize(
    "seed, num_images, chunk_size, ks",
    [
        (0, 40, 1024, (1, 5, 10, 50)),  # one chunk, bigger than the data; K above T and N
        (1, 37, 8, (1, 5, 10, 50)),  # 8 does not divide 37: padded last chunk
        (2, 50, 7, (1, 2, 3)),
        (3, 23, 1, (1, 5)),  # one image per chunk
        (4, 64, 16, (3, 1, 10)),  # exact multiple; unsorted ks
    ],
)
def test_indexed_matches_reference(seed, num_images, chunk_size, ks):
    images, texts, text_image = make_set(seed, num_images)
    got = retrieval_metrics_indexed(images, texts, text_image, ks=ks, chunk_size=chunk_size)
    assert_metrics_equal(got, reference_metrics(images, texts, text_image, ks))


def test_chunk_size_does_not_change_result():
    images, texts, text_image = make_set(5, 45, dim=32)
    results = [
        retrieval_metrics_indexed(images, texts, text_image, chunk_size=c) for c in (1, 4, 10, 45, 99)
    ]
    for result in results[1:]:
        assert result == results[0]


def test_median_rank_r1_and_mean_recall():
    images, texts, text_image = make_set(6, 30)
    i2t, t2i = reference_ranks(images, texts, text_image)
    got = retrieval_metrics_indexed(images, texts, text_image, ks=(1, 5), chunk_size=4)
    assert got["i2t_median_rank"] == float(np.median(i2t))
    assert got["t2i_median_rank"] == float(np.median(t2i))
    assert got["r1"] == pytest.approx((got["i2t_recall@1"] + got["t2i_recall@1"]) / 2)
    four = [got[f"{d}_recall@{k}"] for d in ("i2t", "t2i") for k in (1, 5)]
    assert got["mean_recall"] == pytest.approx(sum(four) / 4)


def test_r1_present_without_k1():
    images, texts, text_image = make_set(7, 20)
    with_k1 = retrieval_metrics_indexed(images, texts, text_image, ks=(1,))
    without = retrieval_metrics_indexed(images, texts, text_image, ks=(5,))
    assert "i2t_recall@1" not in without
    assert without["r1"] == with_k1["r1"]


def test_k_beyond_candidates_is_full_recall():
    images, texts, text_image = make_set(8, 10)
    got = retrieval_metrics_indexed(images, texts, text_image, ks=(1000,))
    assert got["i2t_recall@1000"] == 1.0 and got["t2i_recall@1000"] == 1.0


def test_identical_embeddings_are_perfect():
    rng = np.random.default_rng(9)
    images = _normalise(rng.standard_normal((50, 32))).astype(np.float32)
    got = retrieval_metrics_indexed(images, images.copy(), np.arange(50), ks=(1, 5), chunk_size=16)
    assert got["i2t_recall@1"] == 1.0 and got["t2i_recall@1"] == 1.0
    assert got["i2t_median_rank"] == 1.0 and got["t2i_median_rank"] == 1.0
    assert got["r1"] == 1.0 and got["mean_recall"] == 1.0


def test_exact_tie_goes_to_the_query():
    # Image 0's caption is the image itself, and the same vector is also a caption of image 1:
    # an exact tie at the top of image 0's list, which must not push image 0 down.
    images, texts, text_image = make_set(10, 12, max_captions=1)
    texts[text_image == 0] = images[0]
    texts = np.concatenate([texts, images[:1]])
    text_image = np.concatenate([text_image, [1]])
    i2t, _, _, _ = metrics.ranks(jnp.asarray(images), jnp.asarray(texts), jnp.asarray(text_image, jnp.int32), 5)
    assert i2t[0] == 1


@pytest.mark.parametrize("ids_kind", ["str", "int", "numpy_int", "numpy_str", "tuple"])
def test_row_level_equals_indexed(ids_kind):
    images, texts, text_image = make_set(11, 33)
    names = {
        "str": [f"COCO_{i:06d}.jpg" for i in text_image],
        "int": [int(1000 - 7 * i) for i in text_image],
        "numpy_int": (1000 - 7 * text_image).astype(np.int64),
        "numpy_str": np.array([f"img{i}" for i in text_image]),
        "tuple": [("coco", int(i)) for i in text_image],
    }
    rows_image = images[text_image]  # the row-level layout: image repeated for each caption
    got = retrieval_metrics(rows_image, texts, names[ids_kind], ks=(1, 3, 10), chunk_size=6)
    want = retrieval_metrics_indexed(images, texts, text_image, ks=(1, 3, 10), chunk_size=6)
    assert got == want


def test_row_level_deduplicates_images():
    # Without de-duplication each image would compete with copies of itself and lose t2i R@1.
    images, texts, text_image = make_set(12, 20, max_captions=5)
    got = retrieval_metrics(images[text_image], texts, list(text_image), ks=(1,))
    assert_metrics_equal(got, reference_metrics(images, texts, text_image, (1,)))


def test_accepts_bf16_and_jax_inputs():
    images, texts, text_image = make_set(13, 25)
    images16, texts16 = jnp.asarray(images, jnp.bfloat16), jnp.asarray(texts, jnp.bfloat16)
    want = reference_metrics(
        np.asarray(images16, np.float32), np.asarray(texts16, np.float32), text_image, (1, 5)
    )
    got = retrieval_metrics_indexed(images16, texts16, jnp.asarray(text_image), ks=(1, 5))
    assert_metrics_equal(got, want)


def test_unnormalised_inputs_rank_by_cosine():
    """Raw embeddings of very different norms rank as the original does: by cosine, not dot product."""
    images, texts, text_image = make_set(14, 30)
    rng = np.random.default_rng(14)
    images = images * rng.uniform(0.2, 5.0, (len(images), 1)).astype(np.float32)
    texts = texts * rng.uniform(0.2, 5.0, (len(texts), 1)).astype(np.float32)
    got = retrieval_metrics_indexed(images, texts, text_image, ks=(1, 5), chunk_size=8)
    assert_metrics_equal(got, reference_metrics(images, texts, text_image, (1, 5)))
    # the dot product ranks differently on these inputs, so the check above can tell the two apart
    i2t_dot = np.argmax(images @ texts.T, axis=1)
    i2t_cos = np.argmax(_normalise(images) @ _normalise(texts).T, axis=1)
    assert (i2t_dot != i2t_cos).any()


def test_huge_magnitudes_rank_by_cosine():
    """Rows near float32's range (whose squared norm overflows) still rank by their direction."""
    images, texts, text_image = make_set(17, 20)
    got = retrieval_metrics_indexed(images * 1e30, texts * 3e25, text_image, ks=(1, 5))
    assert_metrics_equal(got, reference_metrics(images, texts, text_image, (1, 5)))


def test_one_compile_for_many_chunks():
    images, texts, text_image = make_set(15, 53, dim=24)  # shapes used by no other test
    program = metrics._ranks_program
    before = program._cache_size()
    retrieval_metrics_indexed(images, texts, text_image, chunk_size=5)  # 11 chunks
    assert program._cache_size() == before + 1
    retrieval_metrics_indexed(images, texts, text_image, chunk_size=5)
    assert program._cache_size() == before + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text_image=np.array([0, 1, 5])), "must lie in"),
        (dict(text_image=np.array([0, 1, 1])), "have no caption"),
        (dict(text_image=np.array([0, 1])), "must have shape"),
        (dict(text_image=np.array([0.0, 1.0, 2.0])), "integer"),
        (dict(ks=(0, 1)), "positive integers"),
        (dict(ks=()), "at least one"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(text_emb=np.ones((3, 5), np.float32)), "same dim"),
        (dict(image_emb=np.ones((3,), np.float32)), "2-D"),
        (dict(image_emb=np.ones((3, 4), np.int32)), "float"),
        (dict(text_emb=np.full((3, 4), np.nan, np.float32)), "NaN"),
    ],
)
def test_bad_inputs(kwargs, message):
    rng = np.random.default_rng(16)
    args = dict(
        image_emb=rng.standard_normal((3, 4)).astype(np.float32),
        text_emb=rng.standard_normal((3, 4)).astype(np.float32),
        text_image=np.array([0, 1, 2]),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics_indexed(**args)


def test_row_level_row_count_mismatch():
    with pytest.raises(ValueError, match="same number of rows"):
        retrieval_metrics(np.ones((4, 3)), np.ones((4, 3)), ["a", "b", "c"])


def test_format_table():
    images, texts, text_image = make_set(17, 20)
    m = retrieval_metrics_indexed(images, texts, text_image)
    table = format_table(m)
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "R@50", "MedR"]
    assert lines[1].split()[0] == "i2t" and lines[2].split()[0] == "t2i"
    assert float(lines[1].split()[1]) == pytest.approx(100 * m["i2t_recall@1"], abs=0.005)
    assert float(lines[2].split()[-1]) == pytest.approx(m["t2i_median_rank"], abs=0.05)
    assert "mean recall" in lines[3]
    assert len({len(line) for line in lines[:3]}) == 1  # fixed width


def test_core_module_imports_no_optuna_or_config():
    code = (
        "import sys, xclip_jax.metrics; "
        "bad = [m for m in sys.modules if m.startswith('optuna') or m == 'xclip_jax.config']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
