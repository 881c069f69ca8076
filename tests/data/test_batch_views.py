"""Views made for the whole batch (src/data/batch_views.py): each operation checked against what
it must do, per-image randomness, and the self-supervised methods training on them."""

import pytest
import torch
from helpers import params, same, stop_and_resume

from src.data import batch_views as bv
from src.data.digits import digits


@pytest.fixture
def images():
    return digits(seed=0).train.inputs[:64]


def test_a_full_crop_without_rotation_is_the_image(images, monkeypatch):
    monkeypatch.setattr(bv, "RATIO", (1.0, 1.0))
    out = bv.geometry(images, 8, (1.0, 1.0), 0.0, 0.0, flip=False)
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_flips_are_per_image_and_crops_differ_between_identical_images(images, monkeypatch):
    monkeypatch.setattr(bv, "RATIO", (1.0, 1.0))
    torch.manual_seed(0)
    out = bv.geometry(images, 8, (1.0, 1.0), 0.0, 0.0, flip=True)
    flipped = [bool(torch.allclose(o, x.flip(-1), atol=1e-6)) for o, x in zip(out, images)]
    kept = [bool(torch.allclose(o, x, atol=1e-6)) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    same_image = images[:1].expand(32, -1, -1, -1)
    crops = bv.geometry(same_image, 8, (0.3, 0.6), 10.0, 0.1, flip=False)
    assert len({tuple(c.flatten().round(decimals=4).tolist()) for c in crops}) == 32
    assert bv.geometry(images, 5, (0.3, 0.6), 0.0, 0.0, False).shape == (64, 1, 5, 5)


def test_colour_stays_in_range_and_solarize_inverts_the_bright_pixels(images):
    out = bv.colour(images, 0.4, 0.0, 0.0, 0.0)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    sol = bv.colour(images, 0.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(sol, torch.where(images >= 0.5, 1 - images, images))
    rgb = images.expand(-1, 3, -1, -1).clone()
    rgb[:, 0] *= 0.5
    gray = bv.colour(rgb, 0.0, 0.0, 1.0, 0.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_blur_keeps_a_flat_image_and_smooths_an_edge():
    flat = torch.full((4, 1, 8, 8), 0.7)
    torch.testing.assert_close(bv.blur(flat, 2.0, p=1.0), flat)
    edge = torch.zeros(4, 1, 8, 8)
    edge[..., 4:] = 1
    out = bv.blur(edge, 2.0, p=1.0)
    assert (out[..., 3] > 0).all() and (out[..., 4] < 1).all()
    torch.testing.assert_close(bv.blur(edge, 2.0, p=0.0), edge)  # p 0: untouched


SSL = {
    "data.batch_size": 64,
    "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
    "trainer.max_steps": 6,
    "checkpoint.every_n_steps": 3,
    "callbacks": [{"type": "online_knn", "k": 5}],
}


@pytest.mark.parametrize(
    "task",
    [
        {
            "type": "simclr",
            "proj_dim": 16,
            "hidden": 32,
            "views": {"type": "batch_views", "blur": 1.0, "solarize": 0.2},
        },
        {
            "type": "dino",
            "out_dim": 16,
            "hidden": 16,
            "bottleneck": 8,
            "use_bn": True,
            "views": {
                "type": "batch_multi_crop",
                "global_views": 2,
                "local_views": 2,
                "local_size": 6,
            },
        },
    ],
    ids=lambda t: t["type"],
)
def test_methods_train_on_batch_views_and_resume_exactly(write_config, tmp_path, task):
    """The views' random numbers come from the checkpointed generator: 6 straight == 3 + resume."""
    straight, resumed, a, b = stop_and_resume(
        write_config, tmp_path / "runs", {**SSL, "task": task}, 3, [{"type": "online_knn", "k": 5}]
    )
    assert (
        not hasattr(straight.data.train, "view_transform")
        or straight.data.train.view_transform is None
    )  # nothing per sample in the loader
    assert same(params(straight), params(resumed))
    assert a == b and all(r["train/loss"] == r["train/loss"] for r in a if "train/loss" in r)
