"""Pictures of a training run: its curves, and where the heads put the test set's embeddings.

numpy and matplotlib only (t-SNE needs the optional scikit-learn, the ``viz`` extra); every
function takes host arrays and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xclip_jax.errors import install_hint
from xclip_jax.spec import key_seed

PCA_COMPONENTS = 50
EXPLAINED_LINE = 0.9


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list, best_epoch: int, path) -> None:
    """Loss and validation R@1 per epoch, the best epoch marked, as a PNG (:func:`curves_figure`)."""
    plt = _pyplot()
    fig = curves_figure(history, best_epoch)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(history: list, best_epoch: int):
    """The training curves' figure: epochs counted from 1 (as the training CLI and the export count
    them), on whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax_r1.plot(epochs, [h["val_r1"] for h in history], marker="o", color="C2", label="val R@1")
    for ax in (ax_loss, ax_r1):
        ax.axvline(best_epoch + 1, color="grey", linestyle="--", label=f"best epoch {best_epoch + 1}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.legend()
    ax_loss.set_title("loss")
    ax_r1.set_title("validation R@1 (mean of i2t, t2i)")
    fig.tight_layout()
    return fig


def sample_pairs(row_image: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` (image, caption) pairs drawn at random without replacement (all when fewer):
    returns (image index, caption row) of each pair."""
    rows = np.asarray(row_image).shape[0]
    pick = np.sort(np.random.default_rng(key_seed(seed)).permutation(rows)[: min(samples, rows)])
    return np.asarray(row_image)[pick], pick


def pca(x_NxD: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the rows (float64 SVD of the centred data): returns (the rows
    projected on the first ``components`` directions, the explained-variance ratio of each)."""
    x = np.asarray(x_NxD, np.float64)
    x = x - x.mean(axis=0)
    _, sing, vt_KxD = np.linalg.svd(x, full_matrices=False)
    var = sing**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    k = min(components, vt_KxD.shape[0])
    return x @ vt_KxD[:k].T, ratio[:k]


def _modality_scatter(ax, points_2xNx2, title: str) -> None:
    for points, label, color in zip(points_2xNx2, ("image", "text"), ("C0", "C1")):
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, color=color, label=label, linewidths=0)
    ax.set_title(title)
    ax.legend(markerscale=3)


def plot_pca(image_NxD: np.ndarray, text_NxD: np.ndarray, path) -> dict:
    """The image and text embeddings in the plane of their first two principal components, and the
    cumulative explained variance of up to 50 components with a 90 % line.

    Returns ``{"components_for_90": n or None, "explained_2": ratio of the first two}``.
    """
    plt = _pyplot()
    n = image_NxD.shape[0]
    projected, ratio = pca(np.concatenate([image_NxD, text_NxD]), PCA_COMPONENTS)
    cumulative = np.cumsum(ratio)
    reach = int(np.searchsorted(cumulative, EXPLAINED_LINE) + 1) if cumulative[-1] >= EXPLAINED_LINE else None
    fig, (ax_2d, ax_var) = plt.subplots(1, 2, figsize=(11, 4.5))
    _modality_scatter(ax_2d, (projected[:n, :2], projected[n:, :2]), f"PCA of {n} image–text pairs")
    ax_2d.set_xlabel(f"PC1 ({100 * ratio[0]:.1f} %)")
    ax_2d.set_ylabel(f"PC2 ({100 * ratio[1]:.1f} %)" if ratio.size > 1 else "PC2")
    ax_var.plot(np.arange(1, cumulative.size + 1), cumulative, marker=".")
    ax_var.axhline(EXPLAINED_LINE, color="grey", linestyle="--", label="90 %")
    if reach:
        ax_var.axvline(reach, color="C3", linestyle=":", label=f"{reach} components")
    ax_var.set_xlabel("components")
    ax_var.set_ylabel("cumulative explained variance")
    ax_var.set_ylim(0, 1.02)
    ax_var.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"components_for_90": reach, "explained_2": float(ratio[:2].sum())}


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def plot_tsne(image_NxD: np.ndarray, text_NxD: np.ndarray, perplexity: float, path, seed: int = 0) -> None:
    """A 2-D t-SNE of the image and text embeddings together, coloured by modality (needs scikit-learn)."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    n = image_NxD.shape[0]
    both = np.concatenate([image_NxD, text_NxD]).astype(np.float32)
    # t-SNE needs perplexity below the number of points.
    perplexity = min(perplexity, max(1.0, (both.shape[0] - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=key_seed(seed)).fit_transform(both)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    _modality_scatter(ax, (points[:n], points[n:]), f"t-SNE of {n} image–text pairs (perplexity {perplexity:g})")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def embedding_figures(zi_NxD, zt_TxD, row_image_T, *, samples: int, perplexity: float, out_dir, prefix: str,
                      seed: int = 0, announce=print) -> list[Path]:
    """The evaluation's pictures of a random sample of ``samples`` pairs: ``PREFIX_tsne.png`` (when
    scikit-learn is installed; otherwise one line says so) and ``PREFIX_pca.png``. Returns the files."""
    out_dir = Path(out_dir)
    image_idx, rows = sample_pairs(row_image_T, samples, seed)
    image = np.asarray(zi_NxD)[image_idx]
    text = np.asarray(zt_TxD)[rows]
    written = [out_dir / f"{prefix}_pca.png"]
    plot_pca(image, text, written[0])
    if tsne_available():
        written.append(out_dir / f"{prefix}_tsne.png")
        plot_tsne(image, text, perplexity, written[-1], seed)
    elif announce:
        announce(f"t-SNE picture skipped: it needs scikit-learn ({install_hint('viz')}); the PCA picture is drawn")
    return written
