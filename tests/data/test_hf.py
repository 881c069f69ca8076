"""Hugging Face datasets from local storage: saved folders and data files, every format, through
the token store for text; bad paths, columns and splits are one line."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from helpers import GPT, metrics, run

from src.core.errors import ConfigError
from src.data.hf import hf_dataset
from src.data.jsonl import instructions, labelled_text, preference
from src.data.text import encode_documents, load_tokenizer, read, resolve_files

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def corpus():
    """The json package's files as documents."""
    return [read(f) for f in resolve_files(["stdlib:json"])]


@pytest.fixture
def saved(tmp_path, corpus):
    """A DatasetDict saved with save_to_disk: the text in a 'content' column."""
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": corpus[:-1]}),
            "validation": datasets.Dataset.from_dict({"content": corpus[-1:]}),
        }
    ).save_to_disk(str(folder))
    return folder


def test_text_blocks_are_the_documents_ids_and_a_second_load_reads_the_store(
    saved, corpus, tokenizer_dir, tmp_path
):
    kw = dict(
        seed=0,
        path=str(saved),
        columns={"text": "content"},
        tokenizer=str(tokenizer_dir),
        val_split="validation",
        block_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    dm = hf_dataset(**kw)
    tok = load_tokenizer(str(tokenizer_dir))
    stream = torch.from_numpy(__import__("numpy").concatenate(encode_documents(tok, corpus[:-1])))
    n = len(stream) // 16
    assert len(dm.train) == n
    assert torch.equal(
        dm.train.__getitems__(list(range(n)))["input_ids"].flatten(), stream[: n * 16]
    )
    assert dm.info.extra["token_stores"][0]["built_seconds"] is not None
    again = hf_dataset(**kw)
    assert [s["built_seconds"] for s in again.info.extra["token_stores"]] == [None, None]
    assert again.train.store.folder == dm.train.store.folder


def test_a_language_model_trains_on_a_saved_dataset_with_its_own_bpe(write_config, saved, tmp_path):
    data = {
        "type": "hf_dataset",
        "path": str(saved),
        "columns": {"text": "content"},
        "val_split": "validation",
        "vocab_size": 400,
        "block_size": 32,
        "batch_size": 8,
    }
    cfg = write_config(
        {
            "data": data,
            "model": GPT,
            "task": {"type": "causal_lm", "samples": 0},
            "trainer.max_steps": 4,
            "trainer.eval_every_n_steps": 4,
        }  # fmt: skip
    )
    run(cfg)
    rows = metrics(tmp_path / "runs/tiny")
    assert rows[-1]["step"] == 4 and rows[-1]["val/loss"] > 0
    info = json.loads((tmp_path / "runs/tiny/run_info.json").read_text())
    stores = info["params"]["data.token_stores"]
    assert len(stores) == 2 and all((Path(s) / "manifest.json").is_file() for s in stores)


def test_data_files_with_mapped_columns_build_the_jsonl_formats_examples(tmp_path, tokenizer_dir):
    rows = [
        {"q": f"Add {i} and {i + 1}.", "a": str(2 * i + 1), "cls": "odd" if i % 2 else "even"}
        for i in range(40)
    ]
    # the platform's own JSONL layout, and the same rows under other column names
    (tmp_path / "alpaca.jsonl").write_text(
        "".join(json.dumps({"instruction": r["q"], "output": r["a"]}) + "\n" for r in rows)
    )
    (tmp_path / "labelled.jsonl").write_text(
        "".join(json.dumps({"text": r["q"], "label": r["cls"]}) + "\n" for r in rows)
    )
    (tmp_path / "pref.jsonl").write_text(
        "".join(
            json.dumps({"prompt": r["q"], "chosen": r["a"], "rejected": "no"}) + "\n" for r in rows
        )  # fmt: skip
    )
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(
        [{"prompt": r["q"], "chosen": r["a"], "rejected": "no"} for r in rows]
    ).to_csv(str(tmp_path / "pref.csv"))
    tok = str(tokenizer_dir)
    common = dict(seed=0, tokenizer=tok, cache_dir=str(tmp_path / "cache"))
    cases = [
        (
            hf_dataset(path=str(tmp_path / "rows.parquet"), format="alpaca",
                       columns={"instruction": "q", "output": "a"}, val_fraction=0.1, **common),
            instructions(0, str(tmp_path / "alpaca.jsonl"), tok, val_fraction=0.1),
        ),
        (
            hf_dataset(path=str(tmp_path / "rows.parquet"), format="labelled",
                       columns={"text": "q", "label": "cls"}, val_fraction=0.2, **common),
            labelled_text(0, str(tmp_path / "labelled.jsonl"), tok, val_fraction=0.2),
        ),
        (
            hf_dataset(path=str(tmp_path / "pref.csv"), format="preference", **common),
            preference(0, str(tmp_path / "pref.jsonl"), tok),
        ),
    ]  # fmt: skip
    for ours, theirs in cases:
        for a, b in ((ours.train, theirs.train), (ours.val, theirs.val)):
            assert len(a) == len(b) > 0
            for i in range(len(a)):
                assert a[i].keys() == b[i].keys()
                assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    assert cases[1][0].info.class_names == ("even", "odd")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"path": "imdb"}, "not downloaded at run time"),
        ({"path": "{empty}"}, "a folder with no data files"),
        ({"path": "{saved}", "columns": {"text": "body"}}, "no column 'body'"),
        ({"path": "{saved}"}, "no column 'text' for the text format's 'text'"),
        ({"path": "{saved}", "columns": {"txt": "content"}}, "format 'text' has no field txt"),
        (
            {"path": "{saved}", "columns": {"text": "content"}, "val_split": "test"},
            "has no split 'test' (it has: train, validation)",
        ),  # fmt: skip
        ({"path": "{saved}", "format": "alpaca"}, "no column 'instruction'"),  # fmt: skip
    ],
)
def test_bad_paths_columns_and_splits_are_one_line(saved, tmp_path, kwargs, message):
    (tmp_path / "empty").mkdir()
    kwargs = {
        k: (v.format(saved=saved, empty=tmp_path / "empty") if isinstance(v, str) else v)
        for k, v in kwargs.items()
    }
    with pytest.raises(ConfigError) as err:
        hf_dataset(seed=0, cache_dir=str(tmp_path / "cache"), tokenizer=None, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_hub_name_on_the_command_line_is_exit_2(tmp_path):
    from conftest import make_config

    from src.main import main

    cfg = make_config(tmp_path, {"data": {"type": "hf_dataset", "path": "stanfordnlp/imdb"}})
    assert main(["--config", str(cfg)]) == 2


def test_text_data_files_split_by_row_with_the_seed(tmp_path, corpus, tokenizer_dir):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus))
    kw = dict(
        path=str(tmp_path / "docs.jsonl"),
        columns={"text": "body"},
        tokenizer=str(tokenizer_dir),
        val_fraction=0.25,
        block_size=8,
        cache_dir=str(tmp_path / "cache"),
    )
    dm = hf_dataset(seed=0, **kw)
    tok = load_tokenizer(str(tokenizer_dir))
    everything = sum(len(ids) for ids in encode_documents(tok, corpus))
    assert len(dm.train.store) + len(dm.val.store) == everything
    assert 0 < len(dm.val.store) < len(dm.train.store)
    other = hf_dataset(seed=1, **kw)  # another seed holds out other rows: other stores
    assert other.train.store.folder != dm.train.store.folder


def _digit_images(n: int):
    """The first ``n`` digits as 8x8 greyscale PIL images and their classes."""
    import numpy as np
    from PIL import Image

    from src.data.digits import load_digits_arrays

    x, y = load_digits_arrays()
    pixels = (x[:n].reshape(-1, 8, 8) * (255 / 16)).round().astype(np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels], [int(v) for v in y[:n]]


def test_images_with_labels_train_a_cnn_from_a_saved_dataset_and_from_image_paths(
    write_config, tmp_path
):
    """image_label reads an Image column with ClassLabel names (a saved dataset) and file paths
    with label names (a CSV): each sample is the image as image_folder transforms it; a CNN
    trained on the saved digits beats chance by far; a broken image is one line naming its row."""
    from src.core.errors import DataError
    from src.data.image_folder import image_transform

    images, labels = _digit_images(600)
    names = [f"d{k}" for k in range(10)]
    features = datasets.Features(
        {"picture": datasets.Image(), "digit": datasets.ClassLabel(names=names)}
    )
    saved = tmp_path / "digits"
    datasets.Dataset.from_dict(
        {"picture": images, "digit": labels}, features=features
    ).save_to_disk(str(saved))
    kw = dict(format="image_label", columns={"image": "picture", "label": "digit"}, image_size=8)
    dm = hf_dataset(seed=0, path=str(saved), channels=1, val_fraction=0.2, **kw)
    assert dm.info.class_names == tuple(names) and dm.info.input_shape == (1, 8, 8)
    assert len(dm.train) + len(dm.val) == 600 and sum(dm.info.class_counts) == len(dm.train)
    row = dm.train.indices[5]
    sample = dm.train[5]
    assert torch.equal(sample["inputs"], image_transform(8, 1)(images[row]))
    assert int(sample["labels"]) == labels[row]

    folder = tmp_path / "files"
    folder.mkdir()
    lines = ["path,name"]
    for k in range(30):
        images[k].save(folder / f"{k}.png")
        lines.append(f"{folder / f'{k}.png'},{names[labels[k]]}")
    (folder / "index.csv").write_text("\n".join(lines) + "\n")
    csv = hf_dataset(
        seed=0, path=str(folder / "index.csv"), columns={"image": "path", "label": "name"},
        format="image_label", image_size=8, channels=3, val_fraction=0.2,
    )  # fmt: skip
    k = csv.train.indices[0]
    assert csv.info.class_names == tuple(sorted({names[v] for v in labels[:30]}))
    assert torch.equal(csv.train[0]["inputs"], image_transform(8, 3)(images[k]))
    (folder / f"{k}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"index.csv \[train\] row {k}: unreadable image"):
        csv.train[0]

    cfg = write_config(
        {
            "data": {
                "type": "hf_dataset",
                "path": str(saved),
                "channels": 1,
                "batch_size": 32,
                "val_fraction": 0.2,
                **kw,
            },
            "model": {"type": "cnn", "channels": [16, 32]},
            "trainer.max_steps": 60,
            "trainer.eval_every_n_steps": 60,
        }  # fmt: skip
    )
    run(cfg)
    assert metrics(tmp_path / "runs/tiny")[-1]["val/accuracy"] > 0.6


def test_dataset_images_take_the_decode_cache_and_augmentation(tmp_path):
    images, labels = _digit_images(60)
    saved = tmp_path / "digits"
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))}
    )
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(
        str(saved)
    )
    kw = dict(
        seed=0, path=str(saved), format="image_label", image_size=8, cache_dir=str(tmp_path / "c")
    )
    plain = hf_dataset(**kw)
    cached = hf_dataset(**kw, decode_cache=True)
    for i in (0, 7, len(plain.train) - 1):
        assert torch.equal(plain.train[i]["inputs"], cached.train[i]["inputs"])
    assert torch.equal(plain.val[1]["inputs"], cached.val[1]["inputs"])
    aug = hf_dataset(**kw, augment={"crop_scale": [0.3, 0.6]}, normalize="imagenet")
    torch.manual_seed(0)
    assert not torch.equal(aug.train[3]["inputs"], aug.train[3]["inputs"])
