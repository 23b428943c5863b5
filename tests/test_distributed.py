"""Multi-process plumbing that runs in one process: data shards, argument checks, host transfers.
(The real multi-process runs are in tests/training/test_multiprocess.py.)"""

import jax
import numpy as np
import pytest
import seqio

import moejax.tasks  # noqa: F401  (registers the shipped seqio tasks)
from moejax.data import batches
from moejax.distributed import initialize, replicated, to_host
from moejax.launch import launch_local

LENGTHS = {"inputs": 32, "targets": 16}


def _first(ds):
    return next(ds.as_numpy_iterator())


def test_data_shards_concatenate_the_seqio_shards_in_order():
    """A global batch of ``data_shards=2`` is shard 0's half then shard 1's half: what two
    processes feed (one half each) and what one process reads alone."""
    got = _first(batches.dataset("synth_sort", LENGTHS, 8, encoder_decoder=True, seed=3, data_shards=2))
    assert got["encoder_input_tokens"].shape == (8, 32)
    for shard in range(2):
        ref = seqio.get_dataset("synth_sort", task_feature_lengths=LENGTHS, dataset_split="train", shuffle=True,
                                num_epochs=None, feature_converter=seqio.EncDecFeatureConverter(pack=False), seed=3,
                                shard_info=seqio.ShardInfo(shard, 2), use_cached=False)
        half = _first(ref.batch(4))
        for k in got:
            np.testing.assert_array_equal(got[k][4 * shard:4 * shard + 4], half[k])
    whole = _first(batches.dataset("synth_sort", LENGTHS, 8, encoder_decoder=True, seed=3))
    assert not np.array_equal(whole["encoder_input_tokens"], got["encoder_input_tokens"])


def test_data_shards_with_task_ids_and_bad_values():
    got = _first(batches.dataset("synth_multitask", LENGTHS, 8, encoder_decoder=True, data_shards=4,
                                 with_task_ids=True))
    assert got["task_ids"].shape == (8,) and got["decoder_target_tokens"].shape == (8, 16)
    assert list(batches.local_shards(4)) == [0, 1, 2, 3]          # one process reads every shard
    with pytest.raises(ValueError, match="data_shards=0 must be a positive multiple of the 1 processes"):
        batches.local_shards(0)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 data shards"):
        batches.dataset("synth_sort", LENGTHS, 6, encoder_decoder=True, data_shards=4)


def test_initialize_argument_checks():
    with pytest.raises(ValueError, match="pass coordinator_address, num_processes and process_id together"):
        initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, 2\)"):
        initialize("127.0.0.1:1234", 2, 2)


def test_launch_argument_checks(capsys):
    from moejax.main import main

    with pytest.raises(ValueError, match="sets the coordinator flags itself"):
        launch_local(["train", "--process_count=2"], 2)
    with pytest.raises(ValueError, match="need processes >= 1"):
        launch_local(["train"], 0)
    assert main(["launch", "--processes", "2", "--"]) == 2
    assert "nothing to launch" in capsys.readouterr().err


def test_to_host_and_replicated(make_test_mesh):
    mesh = make_test_mesh({"data": 2, "expert": 4})
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    r = replicated(x, mesh)
    assert r.sharding.is_fully_replicated and r.shape == (8, 3)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert"))))
    np.testing.assert_array_equal(to_host(r), x)
    np.testing.assert_array_equal(to_host(sharded), x)
    np.testing.assert_array_equal(to_host(x), x)
