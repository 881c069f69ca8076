"""Image folders at scale: listed and checked once, decoded once, augmented as timm does."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import digits_folder

from src.core.errors import ConfigError, DataError
from src.data.image_folder import image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("img") / "digits", limit=300)


def test_a_folder_is_checked_once_and_a_changed_file_alone_again(folder, tmp_path):
    """The listing is ImageFolder's (same files, classes and order, so splits do not move); a
    second start opens no file; a changed, an added and a removed file are noticed, and only the
    new or changed ones are checked."""
    from torchvision.datasets import ImageFolder

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    cache = str(tmp_path / "cache")
    first = image_folder(seed=0, root=str(root), image_size=8, channels=1, cache_dir=cache)
    tv = ImageFolder(str(root))
    assert first.train.source.paths == [p for p, _ in tv.samples]
    assert first.info.class_names == tuple(tv.classes)
    assert first.info.extra["images_checked"] == 300
    again = image_folder(seed=0, root=str(root), image_size=8, channels=1, cache_dir=cache)
    assert again.info.extra["images_checked"] == 0
    assert again.train.indices == first.train.indices

    victim = sorted((root / "3").iterdir())[0]
    victim.write_bytes(b"no longer an image")
    shutil.copy(sorted((root / "4").iterdir())[0], root / "4" / "new.png")
    os.remove(sorted((root / "5").iterdir())[0])
    with pytest.raises(ConfigError, match=f"{victim}: not a readable image"):
        image_folder(seed=0, root=str(root), image_size=8, channels=1, cache_dir=cache)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        dm = image_folder(
            seed=0, root=str(root), image_size=8, channels=1, cache_dir=cache, bad_files="skip"
        )
    assert dm.info.extra["images_checked"] == 0  # the failed start above checked both already
    assert len(dm.train) + len(dm.val) == 300 - 1 + 1 - 1


def test_the_decode_cache_gives_the_pixels_of_decoding_and_is_built_once(folder, tmp_path):
    cache = str(tmp_path / "cache")
    plain = image_folder(seed=0, root=str(folder), image_size=12, cache_dir=cache)
    cached = image_folder(
        seed=0, root=str(folder), image_size=12, cache_dir=cache, decode_cache=True
    )
    for i in (0, 7, len(plain.train) - 1):
        assert torch.equal(plain.train[i]["inputs"], cached.train[i]["inputs"])
        assert plain.train[i]["labels"] == cached.train[i]["labels"]
    assert torch.equal(plain.val[3]["inputs"], cached.val[3]["inputs"])
    entry = next((tmp_path / "cache/decoded").glob("*/images.u8"))
    stamp = entry.stat().st_mtime_ns
    image_folder(seed=0, root=str(folder), image_size=12, cache_dir=cache, decode_cache=True)
    assert entry.stat().st_mtime_ns == stamp  # opened, not decoded again
    with open(entry, "r+b") as f:  # damage it
        f.write(b"\xff" * 64)
    with pytest.raises(DataError, match="does not match its manifest"):
        image_folder(seed=0, root=str(folder), image_size=12, cache_dir=cache, decode_cache=True)


def test_timm_augmentation_and_normalisation(folder, tmp_path):
    """Training images are random crops and flips (two reads differ), evaluation images the same
    every time (resize and centre crop); normalisation centres the data; the default is the
    resize alone."""
    cache = str(tmp_path / "cache")
    aug = image_folder(
        seed=0,
        root=str(folder),
        image_size=16,
        augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5},
        normalize="imagenet",
        cache_dir=cache,
    )
    torch.manual_seed(0)
    a, b = aug.train[5]["inputs"], aug.train[5]["inputs"]
    assert a.shape == (3, 16, 16) and not torch.equal(a, b)
    assert torch.equal(aug.val[2]["inputs"], aug.val[2]["inputs"])
    plain = image_folder(seed=0, root=str(folder), image_size=16, cache_dir=cache)
    x = plain.train[5]["inputs"]
    assert torch.equal(x, plain.train[5]["inputs"]) and 0 <= x.min() and x.max() <= 1
    normed = image_folder(
        seed=0,
        root=str(folder),
        image_size=16,
        normalize={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        cache_dir=cache,
    )
    assert torch.allclose(normed.train[5]["inputs"], (x - 0.5) / 0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment={auto_augment: nonsense-m9}", "data.augment: timm refused it"),
        ("data.normalize={mean: [0.5], std: [0.5]}", "data.normalize: mean and std need 3"),
        ("data.augment={hflip: 2}", "data.augment.hflip: Input should be less than or equal to 1"),
        ("data.augment=random", "data.augment: Value error, expected none, timm"),
    ],
)
def test_bad_augmentation_is_one_line(folder, write_config, tmp_path, capsys, override, message):
    from src.main import main

    cfg = write_config({"data": {"type": "image_folder", "root": str(folder), "image_size": 8}})
    assert main(["--config", str(cfg), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_an_image_damaged_after_its_check_is_one_line_from_a_loader_worker(
    folder, tmp_path, capsys
):
    """An image whose bytes changed after it was checked (size and mtime kept, so the listing
    still trusts it) fails when a loader worker decodes it: one line naming the file, exit 2."""
    from src.main import main

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    cfg = {"type": "image_folder", "root": str(root), "image_size": 8, "val_fraction": 0.0}
    overrides = [f"data={cfg}".replace("'", ""), "data.num_workers=2", "data.batch_size=300"]
    from conftest import make_config

    path = make_config(tmp_path, {"trainer.max_steps": 1})
    assert main(["--config", str(path), *overrides, "name=first"]) == 0
    victim = sorted((root / "2").iterdir())[3]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[40:] = b"\x00" * (len(data) - 40)  # the header stays, the pixels are gone
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(["--config", str(path), *overrides, "name=second"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {victim}: unreadable image"), err


@pytest.mark.parametrize(
    "channels, normalize", [(1, None), (3, None), (3, "imagenet"), (1, "imagenet")]
)
def test_the_resize_transform_is_torchvisions_pipeline(folder, channels, normalize):
    """augment: none gives exactly what v2.Compose([ToImage, Grayscale/RGB, Resize, ToDtype,
    Normalize]) gives, for grey and RGB images."""
    from PIL import Image
    from torchvision.transforms import v2

    from src.data.image_transforms import ImageTransforms

    t = ImageTransforms(12, channels, None, normalize)
    steps = [
        v2.ToImage(),
        v2.Grayscale(1) if channels == 1 else v2.RGB(),
        v2.Resize((12, 12), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if t.norm is not None:
        steps.append(v2.Normalize(list(t.norm[0]), list(t.norm[1])))
    reference = v2.Compose(steps)
    for path in sorted(folder.glob("*/*.png"))[:20]:
        for mode in ("RGB", "L"):
            im = Image.open(path).convert(mode)
            assert torch.equal(t.train(im), reference(im))
