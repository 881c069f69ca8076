"""Plain-text corpora: the split by file (blocks and their store: test_token_store.py)."""

from src.data.text import resolve_files, split_by_file


def test_split_is_by_file_and_seeded():
    files = resolve_files(["stdlib:email"])
    tr, va = split_by_file(files, 0.2, 0)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(files)
    assert split_by_file(files, 0.2, 0) == (tr, va) and split_by_file(files, 0.2, 1) != (tr, va)
