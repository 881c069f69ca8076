"""Plain-text corpora: packing into blocks, the split by file."""

from src.data.text import EOS, pack, resolve_files, split_by_file, train_tokenizer


def test_packing_puts_eos_between_documents_and_cuts_full_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    (tmp_path / "b.txt").write_text("delta epsilon")
    files = sorted(tmp_path.glob("*.txt"))
    tok = train_tokenizer(files, 300)
    blocks, n_bytes, n_tokens = pack(tok, files, 4)
    ids = tok(["alpha beta gamma", "delta epsilon"], add_special_tokens=False)["input_ids"]
    stream = ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id]
    assert n_tokens == len(stream) and n_bytes == len("alpha beta gamma") + len("delta epsilon")
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS


def test_split_is_by_file_and_seeded():
    files = resolve_files(["stdlib:email"])
    tr, va = split_by_file(files, 0.2, 0)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(files)
    assert split_by_file(files, 0.2, 0) == (tr, va) and split_by_file(files, 0.2, 1) != (tr, va)
