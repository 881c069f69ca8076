"""Layer 1: rank arithmetic and launcher detection, every rank in one process."""

import pytest

from src.core.errors import ConfigError
from src.data.loader import ResumableSampler
from src.distributed.launch import launch_env


def test_missing_launcher_is_a_one_line_error_with_the_command():
    with pytest.raises(ConfigError) as e:
        launch_env("ddp", {})
    msg = str(e.value)
    assert "'ddp' needs a launcher" in msg and "torchrun --nproc_per_node N" in msg
    assert "\n" not in msg


def test_launch_env_reads_torchrun_variables():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    e = launch_env("ddp", env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (3, 1, 4, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_see_the_global_batch_a_single_process_sees(world):
    """Rank r takes every world-th index: per-rank batches of B/world form the same global batch."""
    single = list(ResumableSampler(64, True, 7))
    per_rank = [list(ResumableSampler(64, True, 7, r, world)) for r in range(world)]
    b = 16
    for step in range(64 // b):
        union = sorted(i for r in per_rank for i in r[step * b // world : (step + 1) * b // world])
        assert union == sorted(single[step * b : (step + 1) * b])
