"""The sharded reader: a deterministic order fixed by (seed, global sample index)."""
from __future__ import annotations

import numpy as np
import pytest

from mamba_slm.platform.train.data import PackedSampleReader, StepBatches, rank_sample_ids


def _rows(reader, ids):
    return reader.rows(np.asarray(ids))[0]


def test_each_epoch_is_a_permutation_of_all_rows_and_epochs_differ(synthetic_data):
    reader = PackedSampleReader(synthetic_data, seed=3, window_blocks=2)
    n = len(reader)
    assert n == 512 and reader.seq_len == 64
    epoch0 = [reader.locate(g) for g in range(n)]
    epoch1 = [reader.locate(g) for g in range(n, 2 * n)]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1) and epoch0 != epoch1
    assert epoch0 != [reader.locate(g) for g in range(n)][::-1]
    other_seed = PackedSampleReader(synthetic_data, seed=4, window_blocks=2)
    assert epoch0 != [other_seed.locate(g) for g in range(n)]


def test_order_depends_only_on_seed_and_index(synthetic_data):
    a = PackedSampleReader(synthetic_data, seed=7)
    b = PackedSampleReader(synthetic_data, seed=7)
    ids = np.array([900, 3, 511, 512, 77])
    np.testing.assert_array_equal(_rows(a, ids), _rows(b, ids[::-1])[::-1])  # any read order


def test_batch_is_shifted_targets_with_document_index(synthetic_data):
    reader = PackedSampleReader(synthetic_data, seed=0)
    ids, docs = reader.rows(np.array([5, 6]))
    batch = reader.batch(np.array([5, 6]))
    np.testing.assert_array_equal(batch.input_ids.numpy(), ids[:, :-1])
    np.testing.assert_array_equal(batch.labels.numpy(), ids[:, 1:])
    np.testing.assert_array_equal(batch.seq_idx.numpy(), docs[:, :-1])
    assert (np.diff(batch.seq_idx.numpy(), axis=1) >= 0).all()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_tile_the_global_batch_for_any_worker_count(world):
    got = np.concatenate([rank_sample_ids(96, 16, r, world) for r in range(world)])
    np.testing.assert_array_equal(got, np.arange(96, 112))


def test_resumed_reader_sees_exactly_the_samples_an_uninterrupted_one_would(synthetic_data):
    def run(position, steps, world):
        out = []
        for rank in range(world):
            reader = PackedSampleReader(synthetic_data, seed=11, window_blocks=2)
            stepper = StepBatches(reader, global_batch=16, micro_batch=4, rank=rank, world=world)
            pos = position
            for _ in range(steps):
                out.append([b.input_ids.numpy() for b in stepper.get(pos)])
                pos += 16
            stepper.close()
        return out

    full = run(0, 40, world=1)  # 640 samples: crosses the epoch boundary at 512
    resumed = run(0, 25, world=1) + run(25 * 16, 15, world=1)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    # Two workers together read the same global batches as one worker.
    two = run(25 * 16, 1, world=2)
    np.testing.assert_array_equal(np.concatenate(two[0] + two[1]), np.concatenate(full[25]))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PackedSampleReader(tmp_path)
