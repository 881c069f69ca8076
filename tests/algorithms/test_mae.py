"""MAE through a timm ViT."""

import torch
from helpers import run

SSL = {
    "data.batch_size": 64,
    "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
    "trainer.max_steps": 6,
    "trainer.eval_every_n_steps": 3,
    "checkpoint.every_n_steps": 3,
    "callbacks": [
        {"type": "online_linear_probe"},
        {"type": "online_knn", "k": 5},
        {"type": "rankme"},
    ],
}


def test_mae_masks_patches_through_a_timm_vit(write_config, tmp_path):
    vit = {
        "type": "timm",
        "name": "vit_tiny_patch16_224",
        "img_size": 8,
        "patch_size": 2,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
    }
    exp = run(
        write_config(
            {**SSL, "model": vit, "task": {"type": "mae", "mask_ratio": 0.75, "decoder_dim": 16}}
        )
    )
    task = exp.task
    imgs = torch.rand(3, 1, 8, 8)
    latent, mask, restore = task.encode(imgs)
    assert latent.shape == (3, 1 + 4, 32)  # cls + 25% of 16 patches: the encoder sees only them
    assert mask.sum(1).tolist() == [12.0] * 3
    assert task.decode(latent, restore).shape == (3, 16, 4)
    patches = task.patchify(imgs)
    assert torch.equal(patches[0, 0], imgs[0, 0, :2, :2].reshape(-1))
