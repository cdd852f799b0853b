"""A deterministic COCO-like synthetic set: the embedded default of the quick start, the tests and the
benchmarks (nothing to download)."""

from __future__ import annotations

import dataclasses

import numpy as np

from xclip_jax.data.sets import EmbeddingSet, from_rows
from xclip_jax.errors import UserError
from xclip_jax.spec import key_seed

# Default noise of the generator. With it a closed-form ridge baseline (text -> image, 2,000 train
# images, 500 held-out images x 5 captions, cosine retrieval) gets image->text R@1 of about 0.5:
# learnable, far from both chance and 1.0. tests/test_data.py keeps it there.
DEFAULT_NOISE = 1.75

_MAP_HIDDEN = 256  # hidden width of each random map: richer than the latent, so maps are curved
# Pre-activation std of each random map's tanh (``nonlinearity``): at 1.5 the tanh clearly bends but
# rarely saturates, and a linear map between the two sides does nearly as well as a trained head.
# Larger values saturate it but do not, alone, put a trained head ahead (at 3 and 5, noise 1.0, the
# CCA baseline still beat clip and mlp heads on 3,000 images); ``fold`` does.
DEFAULT_NONLINEARITY = 1.5
_CHUNK_IMAGES = 2048  # images per generation step, which bounds the temporaries


@dataclasses.dataclass(frozen=True, eq=False)
class _RandomMap:
    """x = tanh(z @ w1 + b1) @ w2 + offset, scaled so each output coordinate has signal std 1."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    offset: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, latent_dim: int, out_dim: int, gain: float) -> _RandomMap:
        f32 = np.float32
        w1 = rng.standard_normal((latent_dim, _MAP_HIDDEN), dtype=f32) * f32(gain / np.sqrt(latent_dim))
        b1 = rng.standard_normal(_MAP_HIDDEN, dtype=f32) * f32(0.5)
        w2 = rng.standard_normal((_MAP_HIDDEN, out_dim), dtype=f32)
        # Unit signal std per coordinate makes `noise` a noise-to-signal ratio.
        probe = np.tanh(rng.standard_normal((4096, latent_dim), dtype=f32) @ w1 + b1)
        w2 /= ((probe - probe.mean(axis=0)) @ w2).std(axis=0)
        # Real embeddings are far from zero-mean (random pairs have clearly positive cosine).
        offset = rng.standard_normal(out_dim, dtype=f32)
        return cls(w1, b1, w2, offset)

    def __call__(self, z: np.ndarray, out: np.ndarray) -> None:
        np.matmul(np.tanh(z @ self.w1 + self.b1), self.w2, out=out)
        out += self.offset


def synthesize(
    n_images: int,
    captions_per_image: int = 5,
    image_dim: int = 768,
    text_dim: int = 1024,
    latent_dim: int = 64,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    nonlinearity: float = DEFAULT_NONLINEARITY,
    fold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate a deterministic COCO-like set of (image, caption) rows.

    Each image has a latent ``z ~ N(0, I_latent_dim)``. The image embedding is a random
    non-linear map of ``z`` plus noise; each caption perturbs ``z`` on its own
    (``z + noise * eps``) and goes through a *different* random map, plus noise. The two maps
    are drawn once per seed, so sets from one call share them. Rows are grouped by image:
    rows ``i*c .. i*c+c-1`` belong to image ``i``, whose id is ``i``.

    Args:
      n_images: number of images; rows = n_images * captions_per_image.
      captions_per_image: captions (rows) per image; the image rows repeat identically.
      image_dim, text_dim: embedding widths.
      latent_dim: width of the shared latent.
      noise: caption perturbation of the latent and additive embedding noise, both relative to
        a signal std of 1. The default gives a linear baseline image->text R@1 of about 0.5.
      seed: together with the sizes, determines every value.
      nonlinearity: the std of each map's tanh input: how bent each random map is (larger values
        saturate the tanh).
      fold: the share of latent coordinates that the captions see only by magnitude
        (``|z_j + noise * eps|``): an image and its mirror image in those coordinates get captions
        drawn alike. The relation between the two sides then has an even part that no linear map
        captures (a linear map sees a coordinate's sign, and the sign is gone) but a head with a
        hidden layer learns; 0 keeps every coordinate as it is.

    Returns:
      (image_rows ``[rows, image_dim]`` float32, text_rows ``[rows, text_dim]`` float32,
      image_ids ``[rows]`` int64).
    """
    if min(n_images, captions_per_image, image_dim, text_dim, latent_dim) < 1:
        raise UserError("synthesize: images, captions, dims and latent_dim must all be at least 1")
    if noise < 0:
        raise UserError(f"synthesize: noise {noise} must be >= 0")
    f32 = np.float32
    maps_rng = np.random.default_rng([key_seed(seed), 0])
    if nonlinearity <= 0:
        raise UserError(f"synthesize: nonlinearity {nonlinearity} must be > 0")
    if not 0.0 <= fold <= 1.0:
        raise UserError(f"synthesize: fold {fold} must be between 0 and 1")
    n_fold = int(round(fold * latent_dim))
    image_map = _RandomMap.draw(maps_rng, latent_dim, image_dim, nonlinearity)
    text_map = _RandomMap.draw(maps_rng, latent_dim, text_dim, nonlinearity)

    c = captions_per_image
    image_rows = np.empty((n_images * c, image_dim), dtype=f32)
    text_rows = np.empty((n_images * c, text_dim), dtype=f32)
    rng = np.random.default_rng([key_seed(seed), 1])
    for start in range(0, n_images, _CHUNK_IMAGES):
        stop = min(start + _CHUNK_IMAGES, n_images)
        z = rng.standard_normal((stop - start, latent_dim), dtype=f32)

        image = np.empty((stop - start, image_dim), dtype=f32)
        image_map(z, out=image)
        image += f32(noise) * rng.standard_normal(image.shape, dtype=f32)
        image_rows[start * c : stop * c].reshape(stop - start, c, image_dim)[:] = image[:, None, :]

        caption_z = np.repeat(z, c, axis=0)
        caption_z += f32(noise) * rng.standard_normal(caption_z.shape, dtype=f32)
        np.abs(caption_z[:, :n_fold], out=caption_z[:, :n_fold])
        text = text_rows[start * c : stop * c]
        text_map(caption_z, out=text)
        text += f32(noise) * rng.standard_normal(text.shape, dtype=f32)
    return image_rows, text_rows, np.repeat(np.arange(n_images, dtype=np.int64), c)


def synthetic_splits(
    n_images: int = 20_000,
    captions_per_image: int = 5,
    image_dim: int = 768,
    text_dim: int = 1024,
    val_images: int = 1_000,
    test_images: int = 1_000,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    latent_dim: int = 64,
    nonlinearity: float = DEFAULT_NONLINEARITY,
    fold: float = 0.0,
) -> dict[str, EmbeddingSet]:
    """Synthetic ``train`` / ``val`` / ``test`` sets from one :func:`synthesize` call.

    One call means one pair of random maps, so a model fit on train transfers to val and test;
    the three sets hold disjoint images (train ids ``0..n_images-1``, then val, then test).
    """
    total = n_images + val_images + test_images
    image_rows, text_rows, ids = synthesize(
        total, captions_per_image, image_dim, text_dim, latent_dim=latent_dim, noise=noise, seed=seed,
        nonlinearity=nonlinearity, fold=fold,
    )
    bounds = {"train": (0, n_images), "val": (n_images, n_images + val_images), "test": (n_images + val_images, total)}
    c = captions_per_image
    return {
        name: from_rows(name, image_rows[a * c : b * c], text_rows[a * c : b * c], ids[a * c : b * c])
        for name, (a, b) in bounds.items()
    }
