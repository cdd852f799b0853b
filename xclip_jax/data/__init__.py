"""Embedding sets: in memory (``sets``), on disk (``files``), split (``splits``), generated
(``synthetic``), loaded from a config with the tuning driver's cache (``loading``), and the
``python -m xclip_jax.data`` command line (``cli``).

Nothing here imports jax: the tuning driver reads and validates data through this package alone.
"""

from xclip_jax.data.files import (
    EXTENSIONS,
    IMAGE_SUFFIX,
    METADATA_SUFFIX,
    TEXT_SUFFIX,
    find_file,
    load_embedding_set,
    load_named_set,
    read_array,
    read_image_ids,
    resolve_file,
    save_set,
    write_embedding_set,
)
from xclip_jax.data.loading import (
    SPLITS,
    cache_dir,
    cached_sources,
    cached_splits,
    load_sets,
    no_test_set,
    read_cache,
    write_cache,
)
from xclip_jax.data.sets import (
    EmbeddingSet,
    check_disjoint,
    describe,
    from_rows,
    source_line,
)
from xclip_jax.data.splits import split_train_test, tuning_subset
from xclip_jax.data.synthetic import DEFAULT_NOISE, DEFAULT_NONLINEARITY, synthesize, synthetic_splits


def main(argv=None):
    """``python -m xclip_jax.data ...`` (see ``xclip_jax.data.cli``)."""
    from xclip_jax.data.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "DEFAULT_NOISE", "DEFAULT_NONLINEARITY", "EXTENSIONS", "SPLITS", "EmbeddingSet", "IMAGE_SUFFIX", "METADATA_SUFFIX", "TEXT_SUFFIX", "cache_dir",
    "cached_sources", "cached_splits", "check_disjoint", "describe", "find_file", "from_rows", "load_embedding_set",
    "load_named_set", "load_sets", "main", "no_test_set", "read_array", "read_cache", "read_image_ids", "resolve_file", "save_set",
    "source_line", "split_train_test", "synthesize", "synthetic_splits", "tuning_subset", "write_cache",
    "write_embedding_set",
]
