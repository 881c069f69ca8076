"""MAE (He et al., 2022) on a timm ViT: the encoder sees only the visible patches; a light decoder
with mask tokens reconstructs the masked ones (per-patch normalised pixels)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from src.algorithms.ssl_base import SSLTask
from src.core.errors import ConfigError
from src.core.registry import TASKS


@TASKS.register("mae")
class MAE(SSLTask):
    """Masked autoencoder: a ViT encodes the visible patches, a small decoder rebuilds the rest."""

    default_views = None  # MAE masks the clean image; no augmented views

    def __init__(
        self,
        model,
        mask_ratio: Annotated[
            float, Field(gt=0, lt=1, description="fraction of patches hidden from the encoder")
        ] = 0.75,
        decoder_dim: Annotated[
            int, Field(gt=0, description="the decoder (timm transformer blocks)")
        ] = 64,
        decoder_depth: Annotated[
            int, Field(ge=1, le=64, description="the decoder (timm transformer blocks)")
        ] = 2,
        decoder_heads: Annotated[
            int, Field(ge=1, description="the decoder (timm transformer blocks)")
        ] = 4,
        norm_pix_loss: Annotated[
            bool,
            Field(
                description="targets are each patch's pixels normalised by its own mean and variance"
            ),
        ] = True,
    ):
        super().__init__(model, None)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.dec = (decoder_dim, decoder_depth, decoder_heads)

    def configure(self, info) -> None:
        m: Any = self.model  # any timm ViT: known by its attributes, not by its class
        if not all(hasattr(m, a) for a in ("patch_embed", "blocks", "pos_embed", "cls_token")):
            raise ConfigError(
                "task: 'mae' needs a timm ViT, e.g. model: {type: timm, name: "
                "vit_tiny_patch16_224, img_size: 8, patch_size: 2, num_classes: 0}"
            )
        super().configure(info)
        from timm.models.vision_transformer import Block

        dim, depth, heads = self.dec
        self.patch = m.patch_embed.patch_size[0]
        self.channels = info.input_shape[0]
        n = m.patch_embed.num_patches
        self.decoder_embed = nn.Linear(m.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=4.0) for _ in range(depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch**2 * self.channels)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) in the patch order of the ViT."""
        p, c = self.patch, self.channels
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def encode(self, imgs: torch.Tensor):
        """Encode a random ``1 - mask_ratio`` of the patches; returns latent, mask (1 = hidden),
        and the permutation that restores patch order."""
        m: Any = self.model  # a timm ViT (configure checked its attributes)
        x = m.patch_embed(imgs)  # (B, N, D)
        prefix = getattr(m, "num_prefix_tokens", 1)
        pos = m.pos_embed
        x = x + (pos if getattr(m, "no_embed_class", False) else pos[:, prefix:])
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        noise = torch.rand(b, n, device=x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, d))  # (B, keep, D)
        cls = m.cls_token + (0 if getattr(m, "no_embed_class", False) else pos[:, :1])
        x = torch.cat([cls.expand(b, -1, -1), visible], dim=1)
        x = m.norm(m.blocks(m.norm_pre(x)))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return x, mask.gather(1, restore), restore

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (B, 1 + keep, dd)
        b, n = restore.shape
        masks = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = patches.gather(1, restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])  # (B, N, p*p*C)

    def training_step(self, batch):
        imgs = batch["inputs"]
        latent, mask, restore = self.encode(imgs)
        pred = self.decode(latent, restore).float()
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "features": latent[:, 0].detach(), "labels": batch["labels"]}
