"""Fixtures of the training tests: a small learnable dataset in the curated format."""
from __future__ import annotations

import pytest

from mamba_slm.platform.train.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """512 train rows of 65 tokens (seq_len 64), vocab 256, 2 shards of 64-row groups."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", seq_len=64,
                                   vocab_size=256, train_rows=512, val_rows=32, shards=2, row_group=64)
