"""``python -m src.main pack``: folders, captions and datasets into shards, atomically, resumable."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest
from helpers import digits_folder

from src.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("img") / "digits", limit=200)


def _digest(out):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.tar"))}


def test_a_stopped_packing_resumes_to_the_same_shards(folder, tmp_path, monkeypatch, capsys):
    """Killed after its third shard (the fourth half written), a packing run again finishes with
    shards byte-identical to an uninterrupted one; the half-written shard is never kept."""
    args = ["pack", "--from", str(folder), "--shard-size", "8KB"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    from src.data import shard_writer

    real = shard_writer.Packing.write

    def stopping(self, samples, shard_bytes, on_shard=None):
        def cut():
            for n, item in enumerate(samples):
                if len(self.done) == 3 and n >= self.samples_done + 2:
                    raise KeyboardInterrupt
                yield item

        return real(self, cut(), shard_bytes, on_shard)

    monkeypatch.setattr(shard_writer.Packing, "write", stopping)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "resumed")])
    out = tmp_path / "resumed"
    assert len(list(out.glob("*.tar"))) == 3 and not list(out.glob("*.tmp"))
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(shard_writer.Packing, "write", real)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert "resuming after 3 finished shards" in capsys.readouterr().out
    assert _digest(out) == _digest(tmp_path / "straight")
    a, b = (
        json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("straight", "resumed")
    )
    assert a["shards"] == b["shards"] and a["samples"] == 200


def test_pack_refuses_to_mix_two_packings(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", "--from", str(folder), "--out", str(out)]) == 0
    before = _digest(out)
    assert main(["pack", "--from", str(folder), "--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out
    assert main(["pack", "--from", str(folder), "--out", str(out), "--resize", "4"]) == 2
    assert "holds a packing of image folder" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    assert main(["pack", "--from", str(folder), "--out", str(tmp_path / "other")]) == 2
    assert "is not empty and holds no packing" in capsys.readouterr().err
    assert _digest(out) == before and sorted(p.name for p in (tmp_path / "other").iterdir()) == [
        "notes.txt"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard-size", "lots"], "--shard-size: 'lots' is not a size"),
        (["--resize", "0"], "--resize: must be > 0"),
        (["--from", "/nonexistent/images"], "--from: not found"),
    ],
)
def test_bad_pack_arguments_are_one_line(folder, tmp_path, capsys, args, message):
    base = {"--from": str(folder), "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    assert main(["pack", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_an_unreadable_source_image_stops_before_anything_is_written(folder, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "3" / "zz.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["pack", "--from", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz.png: not a readable image" in err[0] and not out.exists()
    assert main(["pack", "--from", str(src), "--out", str(out), "--bad-files", "skip"]) == 0
    assert json.loads((out / "manifest.json").read_text())["samples"] == 200


def test_captions_and_a_dataset_are_packed_and_resized(folder, tmp_path):
    """A COCO captions file becomes image_text shards (every caption kept); a Hugging Face
    dataset saved to disk becomes image_label shards with its ClassLabel names; --resize
    re-encodes as JPEG with the shorter side N."""
    from PIL import Image

    files = sorted(folder.glob("*/*.png"))[:20]
    coco = {
        "images": [
            {"id": i, "file_name": f"{p.parent.name}/{p.name}"} for i, p in enumerate(files)
        ],
        "annotations": [
            {"image_id": i, "caption": f"digit {p.parent.name} take {k}"}
            for i, p in enumerate(files)
            for k in (1, 2)
        ],
    }
    (folder / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "caps"
    assert (
        main(["pack", "--from", str(folder / "captions.json"), "--out", str(out), "--resize", "16"])
        == 0
    )
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        names = tf.getnames()
        first = json.loads(tf.extractfile(names[2]).read())
        image = Image.open(tf.extractfile(names[0]))
        assert names[:3] == ["00000000.jpg", "00000000.txt", "00000000.json"]
        assert image.format == "JPEG" and image.size == (16, 16)
    assert first["captions"] == [
        f"digit {files[0].parent.name} take 1",
        f"digit {files[0].parent.name} take 2",
    ]
    assert json.loads((out / "manifest.json").read_text())["format"] == "image_text"

    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [int(p.parent.name) for p in files]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=[f"n{i}" for i in range(10)]),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "hfshards"
    assert main(["pack", "--from", str(tmp_path / "hf"), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["samples"] == 20 and m["classes"] == [f"n{i}" for i in range(10)]
    from src.data.shards import shards

    dm = shards(
        seed=0, paths=str(out), image_size=8, val_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
    assert dm.info.class_names[0] == "n0" and [int(dm.train[i]["labels"]) for i in range(20)] == [
        int(p.parent.name) for p in files
    ]
