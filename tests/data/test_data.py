import numpy as np
import pytest
import torch

from src.core.errors import ConfigError
from src.data.digits import digits
from src.data.loader import ResumableSampler, TrainLoader, eval_loader
from src.data.samplers import ClassBalancedSampler, PKSampler, ShardedBatchSampler


def test_digits_is_real_stratified_and_deterministic():
    a, b = digits(seed=0), digits(seed=0)
    info = a.info
    assert info.num_classes == 10 and info.input_shape == (1, 8, 8)
    assert len(a.train) + len(a.val) == 1797 and info.num_samples == len(a.train)
    totals = torch.bincount(torch.cat([a.train.labels, a.val.labels]))
    assert sum(info.class_counts) == len(a.train)
    assert all(abs(c - 0.8 * t) <= 1 for c, t in zip(info.class_counts, totals.tolist()))
    assert torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.labels, digits(seed=1).val.labels)
    x = a.train.inputs
    assert x.min() == 0 and x.max() == 1


def test_digits_are_scikit_learns_without_importing_it():
    """The packaged file read directly holds exactly what ``load_digits`` returns, and a run on
    the default data does not pay for importing ``sklearn.datasets``."""
    import subprocess
    import sys

    from conftest import ROOT
    from sklearn.datasets import load_digits

    from src.data.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    raw = load_digits()
    assert np.array_equal(images, raw.images) and np.array_equal(labels, raw.target)
    # where scikit-learn keeps its file elsewhere, its own loader finds it
    load_digits_arrays.cache_clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr("src.data.digits._packaged_file", lambda: None)
        images, labels = load_digits_arrays()
    load_digits_arrays.cache_clear()
    assert np.array_equal(images, raw.images) and np.array_equal(labels, raw.target)
    code = "import sys; from src.data.digits import digits; digits(seed=0); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_digits_resize_and_channels():
    dm = digits(seed=0, resize=32, channels=3)
    assert dm.info.input_shape == (3, 32, 32)
    batch = dm.train.__getitems__([0, 1, 2])
    assert batch["inputs"].shape == (3, 3, 32, 32) and batch["labels"].shape == (3,)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_cover_the_data_and_resume(world):
    shards = [ResumableSampler(10, True, 0, r, world) for r in range(world)]
    for s in shards:
        s.set_epoch(3)
    seen = sorted(i for s in shards for i in s)
    assert set(seen) == set(range(10)) and len(seen) == shards[0].per_rank * world
    full = list(shards[0])
    shards[0].set_epoch(3, start=2)
    assert list(shards[0]) == full[2:] and len(shards[0]) == len(full) - 2
    shards[0].set_epoch(4)
    assert list(shards[0]) != full


def test_loader_resumes_mid_epoch_with_the_same_batches():
    ds = digits(seed=0).train
    loader = TrainLoader(ds, ShardedBatchSampler(len(ds), 100, seed=5), seed=5)
    loader.set_epoch(2)
    full = [b["labels"] for b in loader]
    loader.set_epoch(2, start_batch=4)
    rest = [b["labels"] for b in loader]
    assert len(full) == loader.batches_per_epoch() == 14
    assert all(torch.equal(x, y) for x, y in zip(full[4:], rest))


@pytest.mark.parametrize("size", [1, 2, 5, 359])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 32])
def test_eval_loader_gives_every_rank_as_many_batches_and_each_sample_once(size, world, batch):
    """Sharded models gather parameters in every forward: a rank with fewer validation steps
    would hang the others. Padding batches even the count; the real ones cover the split once."""
    ranks = [list(eval_loader(list(range(size)), batch, r, world)) for r in range(world)]
    assert len({len(batches) for batches in ranks}) == 1 and len(ranks[0]) >= 1
    seen = [i for batches in ranks for b, padding in batches if not padding for i in b.tolist()]
    assert sorted(seen) == list(range(size))
    for batches in ranks:  # padding only ever follows the real batches
        flags = [padding for _, padding in batches]
        assert flags == sorted(flags)


def test_image_folder(tmp_path):
    from PIL import Image

    from src.data.image_folder import image_folder

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    dm = image_folder(seed=0, root=str(tmp_path), val_fraction=0.2, image_size=16)
    assert dm.info.class_names == ("cat", "dog") and dm.info.input_shape == (3, 16, 16)
    assert len(dm.train) == 8 and len(dm.val) == 2 and dm.info.class_counts == (4, 4)
    sample = dm.train[0]
    assert sample["inputs"].shape == (3, 16, 16) and sample["inputs"].dtype == torch.float32
    with pytest.raises(ConfigError, match="data.root: folder not found"):
        image_folder(seed=0, root=str(tmp_path / "nope"))


@pytest.mark.parametrize("world", [1, 2])
def test_pk_sampler_gives_every_rank_k_per_world_of_p_classes(world):
    labels = torch.arange(10).repeat_interleave(30)
    shards = [
        PKSampler(labels, 40 // world, 0, r, world, classes_per_batch=5, samples_per_class=8)
        for r in range(world)
    ]
    for s in shards:
        s.set_epoch(1)
    batches = [list(s) for s in shards]
    assert len(batches[0]) == 300 // 40
    for step in range(len(batches[0])):
        for r in range(world):
            got = torch.bincount(labels[batches[r][step]], minlength=10)
            assert sorted(got[got > 0].tolist()) == [8 // world] * 5
    shards[0].set_epoch(1, start_batch=3)
    assert list(shards[0]) == batches[0][3:]


def test_pk_sampler_checks_its_sizes():
    labels = torch.arange(4).repeat_interleave(5)
    with pytest.raises(ConfigError, match="must equal data.batch_size"):
        PKSampler(labels, 10, 0, 0, 1, classes_per_batch=2, samples_per_class=4)


def test_class_balanced_sampler_evens_out_classes():
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    s = ClassBalancedSampler(labels, 50, 0, 0, 1)
    s.set_epoch(0)
    drawn = torch.cat([labels[b] for b in s])
    assert len(drawn) == 1000 and abs(drawn.float().mean().item() - 0.5) < 0.06


ARITH_SFT = {
    "data": {
        "type": "arithmetic",
        "format": "sft",
        "max_operand": 20,
        "train_size": 200,
        "val_fraction": 0.1,
        "batch_size": 16,
    },
    "model": {
        "type": "hf",
        "kind": "causal_lm",
        "config": {
            "model_type": "gpt2",
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
            "n_positions": 16,
        },
    },
    "task": {"type": "causal_lm", "samples": 0},
}


def test_a_sampler_reads_only_what_it_uses(write_config, monkeypatch):
    """length_grouped takes lengths, never labels: no training sample is read to build it (an
    SFT example's labels are a token sequence, not a class); its batches group by length."""
    from src.data.examples import Examples
    from src.run.experiment import build, prepare

    reads = []
    real = Examples.__getitem__
    monkeypatch.setattr(Examples, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    cfg, origins = prepare(
        str(write_config({**ARITH_SFT, "data.sampler": {"type": "length_grouped", "group": 4}}))
    )
    exp = build(cfg, origins)
    assert reads == []
    lengths = torch.tensor(exp.data.train.lengths)
    exp.train_loader.set_epoch(0)
    spreads = [int(lengths[b].max() - lengths[b].min()) for b in exp.train_loader.batch_sampler]
    shuffled = ShardedBatchSampler(len(lengths), 16, 0)
    shuffled.set_epoch(0)
    assert sum(spreads) < sum(int(lengths[b].max() - lengths[b].min()) for b in shuffled)


def test_a_class_sampler_on_data_without_class_labels_is_one_line(write_config):
    from src.run.experiment import build, prepare

    cfg, origins = prepare(
        str(write_config({**ARITH_SFT, "data.sampler": {"type": "class_balanced"}}))
    )
    with pytest.raises(
        ConfigError,
        match=r"^data.sampler: sampler 'class_balanced' balances "
        r"classes, but sample 0 .* has no class label \(its "
        r"'labels' is a tensor of shape \(\d+,\)\)$",
    ):
        build(cfg, origins)


def test_jsonl_errors_name_the_file_line_past_blank_lines(tmp_path):
    from src.data.jsonl import read_jsonl

    f = tmp_path / "pairs.jsonl"
    f.write_text('{"source": "a", "target": "b"}\n\n{"source": "c"}\n')
    with pytest.raises(ConfigError, match=r"pairs.jsonl:3: missing target"):
        read_jsonl(str(f), need=("source", "target"))
    rows = read_jsonl(str(f), need=("source",))
    assert [w.rsplit(":", 1)[1] for w, _ in rows] == ["1", "3"]


def _image_folder(root, n=6):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), color=i * 20).save(root / c / f"{i}.png")


@pytest.mark.parametrize("damage", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_an_unreadable_image_is_one_line_before_training(damage, write_config, tmp_path, capsys):
    from src.main import main

    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs/b/broken.png").write_bytes(damage)
    cfg = write_config(
        {
            "data": {
                "type": "image_folder",
                "root": str(tmp_path / "imgs"),
                "image_size": 8,
                "channels": 1,
                "batch_size": 4,
            }
        }
    )
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}/imgs/b/broken.png: not a readable image" in err[0]
    assert "data.bad_files=skip" in err[0] and not (tmp_path / "runs").exists()
    assert main(["--config", str(cfg), "data.bad_files=skip", "trainer.max_steps=2"]) == 0
    assert "warning: data.root: skipped 1 unreadable images" in capsys.readouterr().err


def test_unreadable_text_and_jsonl_files_are_one_line(tmp_path):
    from src.core.errors import ConfigError
    from src.data.jsonl import read_jsonl
    from src.data.text import resolve_files

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not UTF-8 text"):
        read_jsonl(str(bad))
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_files([str(tmp_path / "nothing" / "*.txt")])


def test_workers_are_dropped_where_they_only_copy_and_kept_for_per_sample_work():
    """An in-memory batch is one gather: 2 workers would pickle every batch through a pipe
    (16k samples/s against 2.9M in process), so the loader runs in process and yields the same
    batches. Per-sample views are real work: their workers stay, and an evaluation loader's
    workers outlive one pass."""
    dm = digits(seed=0)
    batches = ShardedBatchSampler(len(dm.train), 64, seed=0)
    loader = TrainLoader(dm.train, batches, seed=0, num_workers=2)
    assert loader.num_workers == 0
    reference = TrainLoader(dm.train, ShardedBatchSampler(len(dm.train), 64, seed=0), seed=0)
    for a, b in zip(loader, reference):
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])

    dm.train.view_transform = lambda x: [x.flip(-1), x]
    assert TrainLoader(dm.train, batches, seed=0, num_workers=2).num_workers == 2

    class PerSample(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"inputs": torch.full((2,), float(i))}

    ev = eval_loader(PerSample(), 4, num_workers=2)
    assert ev.loader.num_workers == 2 and ev.loader.persistent_workers
    first = [b["inputs"][:, 0].tolist() for b, _ in ev]
    assert (
        first == [b["inputs"][:, 0].tolist() for b, _ in ev] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    )
