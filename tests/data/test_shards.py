"""WebDataset tar shards: read by random access, written by pack, checked against webdataset."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from helpers import digits_folder, metrics

from src.data.shards import shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("img") / "digits")


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    """The digits folder packed into 6 shards by ``python -m src.main pack``."""
    from src.main import main

    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["pack", "--from", str(folder), "--out", str(out), "--shard-size", "120KB"]) == 0
    return out


def _webdataset_shards(folder, out, captions: bool = False):
    """The folder written by webdataset's own ShardWriter: jpg re-encoded, cls, txt."""
    import webdataset as wds
    from PIL import Image

    out.mkdir()
    names = sorted(p.name for p in folder.iterdir())
    files = sorted((p for p in folder.glob("*/*.png")), key=lambda p: p.name)[:400]
    with wds.ShardWriter(str(out / "wds-%04d.tar"), maxcount=100, verbose=0) as sink:
        for n, p in enumerate(files):
            buf = io.BytesIO()
            Image.open(p).convert("RGB").save(buf, format="JPEG", quality=95)
            sample = {
                "__key__": f"s{n:05d}",
                "jpg": buf.getvalue(),
                "cls": names.index(p.parent.name),
            }
            if captions:
                sample["txt"] = f"a handwritten {p.parent.name}"
            sink.write(sample)
    return out


def test_shards_from_webdatasets_own_writer_are_its_samples(folder, tmp_path):
    """Shards written by webdataset's ShardWriter, named by a brace pattern: every sample is the
    image webdataset's own reader decodes, with its class."""
    import webdataset as wds

    out = _webdataset_shards(folder, tmp_path / "wds")
    dm = shards(
        seed=0,
        paths=str(out / "wds-{0000..0003}.tar"),
        image_size=8,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
    )
    assert len(dm.train) == 400 and dm.val is None
    ours = {dm.train.source.keys[i]: dm.train[k] for k, i in enumerate(dm.train.indices)}
    theirs = wds.WebDataset(str(out / "wds-{0000..0003}.tar"), shardshuffle=False).decode(
        "torchrgb"
    )
    seen = 0
    for sample in theirs:
        mine = ours[sample["__key__"]]
        assert int(mine["labels"]) == int(sample["cls"])
        assert (mine["inputs"] - sample["jpg"]).abs().max() < 1e-6  # same pixels, same size (8x8)
        seen += 1
    assert seen == 400


def test_packed_shards_are_read_back_by_webdataset_and_tarfile(folder, packed):
    """Every member pack wrote is the source file's bytes (or its class), read by webdataset's
    reader and by tarfile; the manifest counts them and keeps the class names."""
    import webdataset as wds

    manifest = json.loads((packed / "manifest.json").read_text())
    files = sorted(packed.glob("shard-*.tar"))
    assert [s["file"] for s in manifest["shards"]] == [f.name for f in files] and len(files) > 3
    assert manifest["samples"] == 1797 and manifest["classes"] == [str(d) for d in range(10)]
    sources = sorted(folder.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    members = []
    for f in files:
        with tarfile.open(f) as tf:
            members += [(m.name, tf.extractfile(m).read()) for m in tf]
    assert len(members) == 2 * 1797
    for n, src in enumerate(sources):
        assert members[2 * n] == (f"{n:08d}.png", src.read_bytes())
        assert members[2 * n + 1] == (f"{n:08d}.cls", src.parent.name.encode())
    read = list(wds.WebDataset([str(f) for f in files], shardshuffle=False))
    assert [(s["__key__"], s["png"], int(s["cls"])) for s in read] == [
        (f"{n:08d}", src.read_bytes(), int(src.parent.name)) for n, src in enumerate(sources)
    ]
    assert [s["samples"] for s in manifest["shards"]] == [
        sum(1 for _ in wds.WebDataset(str(f), shardshuffle=False)) for f in files
    ]


def test_digits_trained_from_shards_match_the_digits_in_memory(packed, write_config, tmp_path):
    """exp001's task on the packed digits, 8x8 grey, reaches the in-memory digits' accuracy
    within noise (the PNGs hold the pixels at 15/255 per level, the same information)."""
    from helpers import run

    base = {
        "model": {"type": "cnn", "channels": [16, 32]},
        "optimizer": {"type": "adamw", "lr": 3e-3},
        "trainer.max_steps": 200,
        "trainer.eval_every_n_steps": 200,
    }
    run(write_config({**base, "name": "memory"}, "a.yaml"))
    data = {
        "type": "shards",
        "paths": str(packed),
        "image_size": 8,
        "channels": 1,
        "batch_size": 32,
    }
    run(write_config({**base, "name": "shards", "data": data}, "b.yaml"))
    acc = [
        [r["val/accuracy"] for r in metrics(tmp_path / "runs" / n) if "val/accuracy" in r][-1]
        for n in ("memory", "shards")
    ]
    assert acc[1] > 0.93 and abs(acc[0] - acc[1]) < 0.04, acc


def test_image_text_shards_train_clip(folder, tmp_path, cli):
    """Captioned shards (webdataset's writer, .txt and .cls) train the clip task, and a
    classification task trains from the same shards' labels."""
    out = _webdataset_shards(folder, tmp_path / "wds", captions=True)
    r = cli(
        "--config",
        "configs/clip_digits.yaml",
        f"data={{type: shards, paths: {out}, format: image_text, image_size: 8, channels: 1, "
        "batch_size: 64}",
        "trainer.max_steps=6",
        "trainer.eval_every_n_steps=6",
        f"logging.root={tmp_path}/runs",
    )
    assert r.returncode == 0, r.stderr
    last = [m for m in metrics(tmp_path / "runs/clip_digits") if "val/loss" in m][-1]
    assert np.isfinite(last["val/loss"])


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_bad_shards_are_one_line_naming_shard_and_key(packed, tmp_path, write_config, capsys):
    from src.main import main

    good = (packed / "shard-000000.tar").read_bytes()
    png = packed / "shard-000001.tar"
    with tarfile.open(png) as tf:
        image = tf.extractfile(tf.getmembers()[0]).read()
    cases = {
        "corrupt": [("a.png", image), ("a.cls", b"1"), ("b.png", b"garbage"), ("b.cls", b"2")],
        "unlabelled": [("a.png", image), ("a.cls", b"1"), ("c.png", image)],
    }
    for name, members in cases.items():
        _tar(tmp_path / f"{name}.tar", members)
    (tmp_path / "truncated.tar").write_bytes(good[: len(good) // 2])

    def run_on(paths, *extra):
        cfg = write_config(
            {"data": {"type": "shards", "paths": paths, "image_size": 8, "val_fraction": 0.0}}
        )
        code = main(["--config", str(cfg), *extra])
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run_on(str(tmp_path / "corrupt.tar"))
    assert code == 2 and len(err) == 1 and "corrupt.tar: b: not a readable image" in err[0], err
    code, err = run_on(str(tmp_path / "unlabelled.tar"))
    assert code == 2 and len(err) == 1 and "unlabelled.tar: c: no integer class label" in err[0]
    code, err = run_on(str(tmp_path / "truncated.tar"))
    assert code == 2 and len(err) == 1 and "truncated.tar: not a readable tar shard" in err[0], err
    code, err = run_on(str(packed / "shard-{000000..000099}.tar"))
    assert (
        code == 2
        and len(err) == 1
        and "shard not found" in err[0]
        and f"shard-{len(list(packed.glob('*.tar'))):06d}.tar" in err[0]
    ), err
    assert not (tmp_path / "runs").exists()
    code, err = run_on(
        str(tmp_path / "corrupt.tar"),
        "data.bad_files=skip",
        "trainer.max_steps=1",
        "data.batch_size=1",
    )
    assert code == 0 and any("skipped 1 samples" in line for line in err), err


def test_an_index_is_built_once_and_rebuilt_when_the_shard_changes(packed, tmp_path):
    from src.data import shards as mod

    cache = tmp_path / "c"
    first = mod.index_shard(str(packed / "shard-000002.tar"), cache)
    (entry,) = (cache / "shards").glob("*.json")
    stamp = entry.stat().st_mtime_ns
    assert mod.index_shard(str(packed / "shard-000002.tar"), cache) == first
    assert entry.stat().st_mtime_ns == stamp
    copy = tmp_path / "copy.tar"
    copy.write_bytes((packed / "shard-000002.tar").read_bytes())
    assert [s["key"] for s in mod.index_shard(str(copy), cache)] == [s["key"] for s in first]
    assert len(list((cache / "shards").glob("*.json"))) == 2


def test_decoded_shards_and_tasks_that_train_on_views(packed, tmp_path, cli):
    """The decode cache over shards gives the shards' pixels; SimCLR (views) and ArcFace (a PK
    sampler over the shards' labels) train from shards unchanged."""
    plain = shards(
        seed=0, paths=str(packed), image_size=8, channels=1, cache_dir=str(tmp_path / "c")
    )
    cached = shards(
        seed=0,
        paths=str(packed),
        image_size=8,
        channels=1,
        cache_dir=str(tmp_path / "c"),
        decode_cache=True,
    )
    for i in (0, 100, len(plain.train) - 1):
        assert torch.equal(plain.train[i]["inputs"], cached.train[i]["inputs"])
    data = f"{{type: shards, paths: {packed}, image_size: 8, channels: 1"
    for config, extra in (
        ("configs/ssl_simclr_digits.yaml", ", batch_size: 64, num_workers: 2}"),
        (
            "configs/arcface_digits.yaml",
            ", batch_size: 80, sampler: {type: pk, classes_per_batch: 10, samples_per_class: 8}}",
        ),
    ):
        r = cli(
            "--config",
            config,
            f"data={data}{extra}",
            "trainer.max_steps=3",
            "trainer.max_epochs=null",
            f"logging.root={tmp_path}/runs",
        )
        assert r.returncode == 0, r.stderr[-2000:]
