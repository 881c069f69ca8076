"""Backbones and heads, registered in MODELS. Import order does not matter: each module registers itself."""
