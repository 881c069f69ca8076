"""Causal-LM training throughput: the platform against a minimal hand-written GPT loop.

The peer is what a researcher writes after reading nanoGPT: ``CausalSelfAttention`` with a fused
QKV projection and ``scaled_dot_product_attention(is_causal=True)``, pre-norm blocks, GELU MLP,
tied input/output embeddings, AdamW, gradient clipping, a plain Python loop over random token
blocks (the cost of a step does not depend on the token values). The platform trains
``configs/lm_stdlib.yaml`` (its real data pipeline and its model section at the shape under test)
and reports ``train/tokens_per_sec`` (evaluation and checkpoints excluded). One variant per
process; further arguments are config overrides for ours:

    python -m benchmarks.lm_speed --variant peer --shape base --steps 60
    python -m benchmarks.lm_speed --variant ours --shape base --steps 60 trainer.compile=false
    python -m benchmarks.lm_speed --variant peer --shape base --steps 60 --compile

prints one JSON line: {"variant", "shape", "tokens_per_sec"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lm_stdlib's GPT, and a 4x larger one (twice the width: ~4x the FLOPs per token)
SHAPES = {
    "base": dict(n_layer=3, n_head=4, n_embd=192, block=128, vocab=4096, batch=16),
    "4x": dict(n_layer=3, n_head=8, n_embd=384, block=128, vocab=4096, batch=16),
}
DROPOUT = 0.1  # GPT-2's default, which lm_stdlib keeps: the peer computes the same maths
WARMUP = 10


def peer(shape: dict, steps: int, compiled: bool = False) -> float:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class CausalSelfAttention(nn.Module):
        def __init__(self, d: int, h: int):
            super().__init__()
            self.c_attn, self.c_proj, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), h
            self.drop = nn.Dropout(DROPOUT)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=DROPOUT if self.training else 0.0, is_causal=True
            )
            return self.drop(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d)))

    class Block(nn.Module):
        def __init__(self, d: int, h: int):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, h)
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(
                nn.Linear(d, 4 * d),
                nn.GELU(approximate="tanh"),
                nn.Linear(4 * d, d),
                nn.Dropout(DROPOUT),
            )

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, s: dict):
            super().__init__()
            d = s["n_embd"]
            self.wte, self.wpe = nn.Embedding(s["vocab"], d), nn.Embedding(s["block"], d)
            self.drop = nn.Dropout(DROPOUT)
            self.blocks = nn.ModuleList(Block(d, s["n_head"]) for _ in range(s["n_layer"]))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, s["vocab"], bias=False)
            self.lm_head.weight = self.wte.weight  # weight tying
            self.apply(self._init)

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    torch.manual_seed(0)
    model = GPT(shape)
    if compiled:
        model.compile()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    b, t = shape["batch"], shape["block"]
    data = torch.randint(0, shape["vocab"], (steps + WARMUP, b, t + 1))
    for i in range(steps + WARMUP):
        if i == WARMUP:
            t0 = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    loss.item()
    return steps * b * t / (time.perf_counter() - t0)


def ours(shape: dict, steps: int, extra: list[str] = ()) -> float:
    from src.run.experiment import build, prepare

    s = shape
    root = tempfile.mkdtemp(prefix="lm_speed_")
    # the config's own model section (its GELU kernel included), at the shape under test
    shape_keys = [
        f"model.config.n_layer={s['n_layer']}",
        f"model.config.n_head={s['n_head']}",
        f"model.config.n_embd={s['n_embd']}",
        f"model.config.n_positions={s['block']}",
    ]
    overrides = [
        *shape_keys,
        f"logging.root={root}",
        "logging.loggers=[jsonl]",
        f"trainer.max_steps={steps + WARMUP}",
        f"trainer.log_every={WARMUP}",
        "trainer.eval_every_n_steps=null",
        "checkpoint.save_last=false",
        "checkpoint.every_n_steps=null",
        "task.samples=0",
        f"data.batch_size={s['batch']}",
        f"data.block_size={s['block']}",
        *extra,
    ]
    cfg, origins = prepare(str(ROOT / "configs/lm_stdlib.yaml"), overrides)
    exp = build(cfg, origins)
    exp.run()
    rows = [json.loads(line) for line in (exp.run_dir / "metrics.jsonl").open()]
    rates = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r][1:]
    return len(rates) / sum(1 / r for r in rates)  # every interval after the first (warm-up)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["peer", "ours"], required=True)
    p.add_argument("--shape", choices=list(SHAPES), default="base")
    p.add_argument("--steps", type=int, default=60, help="timed steps (a multiple of 10)")
    p.add_argument("--compile", action="store_true", help="torch.compile the peer's model too")
    p.add_argument("overrides", nargs="*", help="more config overrides for ours")
    a = p.parse_args(argv)
    shape = SHAPES[a.shape]
    tps = (
        peer(shape, a.steps, a.compile)
        if a.variant == "peer"
        else ours(shape, a.steps, a.overrides)
    )
    print(json.dumps({"variant": a.variant, "shape": a.shape, "tokens_per_sec": round(tps, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
