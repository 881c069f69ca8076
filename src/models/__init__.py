"""Backbones and heads, registered in MODELS. Every built-in model module is imported here, so
registration never depends on import order (a new one is a file here plus a name below)."""

from src.models import cnn, hf, mlp, module, timm_backbone
