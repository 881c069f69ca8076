"""Datasets, loaders and samplers; each dataset module registers itself in DATASETS."""
