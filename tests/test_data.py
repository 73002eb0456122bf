"""Data: the stdlib corpus split by file, synthetic tasks that are correct, deterministic batches."""

import re

import pytest
import torch

from moekit.configs import ConfigError
from moekit.data import DataConfig, load_data, train_batch, val_batches
from moekit.data.corpus import split_files, stdlib_files, text_files
from moekit.data.synthetic import arithmetic_text, mixture_text


def test_stdlib_files_exclude_tests_and_split_by_file_deterministically():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert len(rels) > 200 and all(r.endswith(".py") for r in rels)
    assert not [r for r in rels if {"test", "tests", "idle_test"} & set(r.split("/"))]
    train, val = split_files(files, 0.05)
    again_train, again_val = split_files(list(reversed(files)), 0.05)
    assert sorted(train) == sorted(again_train) and sorted(val) == sorted(again_val)  # order-independent
    assert not {r for r, _ in train} & {r for r, _ in val}
    assert len(train) + len(val) == len(files)
    assert 0.01 < len(val) / len(files) < 0.12
    # A file keeps its side when the file list changes (the split hashes the path, not its position).
    sub_train, sub_val = split_files(files[::3], 0.05)
    assert {r for r, _ in sub_val} <= {r for r, _ in val}


def test_split_of_few_files_keeps_both_sides_non_empty():
    files = stdlib_files(max_files=3)
    assert len(files) == 3
    train, val = split_files(files, 0.05)
    assert train and val and len(train) + len(val) == 3


def test_load_data_is_deterministic_and_val_text_comes_from_val_files(tmp_path):
    cfg = DataConfig(max_files=30, max_bytes=300_000)
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.bytes_per_token == 1.0 and a.tokenizer.vocab_size == 256
    train_files, val_files = split_files(stdlib_files(30), 0.05)
    first_val = val_files[0][1].read_bytes()[:200]
    assert bytes(a.val[:200].tolist()) == first_val
    assert first_val not in bytes(a.train.tolist())


def parse_arithmetic(text: str):
    return re.findall(r"^(\d+)([+*])(\d+)=(\d+)$", text, flags=re.M)


def test_arithmetic_answers_are_correct_and_seeded():
    text = arithmetic_text(seed=3, num_bytes=20_000, max_digits=5).decode()
    lines = text.splitlines()
    parsed = parse_arithmetic(text)
    assert len(parsed) == len(lines) > 500
    for a, op, b, c in parsed:
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert len(a) <= 5 and len(b) <= 5
    assert {op for _, op, _, _ in parsed} == {"+", "*"}
    assert max(len(a) for a, *_ in parsed) == 5
    assert arithmetic_text(3, 20_000, 5) == arithmetic_text(3, 20_000, 5)
    assert arithmetic_text(3, 20_000, 5) != arithmetic_text(4, 20_000, 5)


def test_mixture_holds_every_task_and_each_is_correct():
    source = b"".join(f"def f{i}(x):\n    return x + {i}\n".encode() for i in range(200))
    text = mixture_text(seed=1, num_bytes=30_000, source_text=source, max_digits=3).decode()
    copies = re.findall(r"^copy:([a-z]+)>([a-z]+)$", text, flags=re.M)
    sorts = re.findall(r"^sort:([a-z]+)>([a-z]+)$", text, flags=re.M)
    sums = parse_arithmetic(text)
    assert copies and sorts and sums and "return x +" in text
    assert all(a == b for a, b in copies)
    assert all("".join(sorted(a)) == b for a, b in sorts)
    assert all(int(c) == (int(a) + int(b) if op == "+" else int(a) * int(b)) for a, op, b, c in sums)


def test_synthetic_sources_load_with_separate_validation_text():
    data = load_data(DataConfig(source="arithmetic", synthetic_bytes=20_000))
    train, val = bytes(data.train.tolist()).decode(), bytes(data.val.tolist()).decode()
    assert parse_arithmetic(val) and train[:300] != val[:300]
    assert len(val) < len(train) / 10


def test_train_batches_are_a_function_of_seed_step_and_micro_step():
    data = load_data(DataConfig(source="arithmetic", synthetic_bytes=20_000))
    x, y = train_batch(data, 4, 16, seed=0, step=7)
    x2, y2 = train_batch(data, 4, 16, seed=0, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert not torch.equal(x, train_batch(data, 4, 16, seed=0, step=8)[0])
    assert not torch.equal(x, train_batch(data, 4, 16, seed=0, step=7, micro=1)[0])
    assert not torch.equal(x, train_batch(data, 4, 16, seed=1, step=7)[0])


def test_val_batches_are_fixed_and_do_not_overlap():
    data = load_data(DataConfig(source="arithmetic", synthetic_bytes=20_000))
    batches = list(val_batches(data, 4, 16, num_batches=3))
    assert len(batches) == 3
    windows = torch.cat([x for x, _ in batches])
    starts = [int(torch.nonzero((data.val.unfold(0, 16, 1) == w.to(data.val.dtype)).all(1))[0]) for w in windows]
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val_batches(data, 4, 16, num_batches=3)))


def test_text_folder_and_single_file(tmp_path):
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 10)  # binary files are skipped
    assert len(text_files(tmp_path)) == 6
    data = load_data(DataConfig(source="text", path=str(tmp_path), val_fraction=0.3))
    assert b"\0" not in bytes(data.train.tolist()) + bytes(data.val.tolist())
    single = tmp_path / "doc0.txt"
    data = load_data(DataConfig(source="text", path=str(single), val_fraction=0.2))
    whole = single.read_bytes()
    assert bytes(data.train.tolist()) + bytes(data.val.tolist()) == whole
    assert len(data.val) == len(whole) - int(len(whole) * 0.8)


def test_data_errors_explain_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs data.path"):
        DataConfig(source="text")
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(DataConfig(source="text", path=str(tmp_path / "missing")))
    tiny = load_data(DataConfig(source="arithmetic", synthetic_bytes=1000))
    with pytest.raises(ConfigError, match="fewer than model.context"):
        list(val_batches(tiny, 2, 4096, 1))


def test_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "import os\n" * 20],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path / "tok")
    data = load_data(DataConfig(max_files=4, max_bytes=40_000, tokenizer=str(tmp_path / "tok")))
    assert data.tokenizer.vocab_size > 256 and data.train.max() >= 256  # merges are in use
    assert data.bytes_per_token > 1.0
    text = "def f(x):\n    return x + 1\n"
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_data(DataConfig(tokenizer=str(tmp_path / "no-such-tokenizer")))


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i}: " + "abc" * (i % 7 + 1) for i in range(200)]
    datasets.Dataset.from_dict({"body": rows, "n": list(range(200))}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "ds"), hf_text_field="body", val_fraction=0.25)
    data = load_data(cfg)
    train_text, val_text = bytes(data.train.tolist()).decode(), bytes(data.val.tolist()).decode()
    # every row lands on exactly one side, split by document and the same way every time
    assert sum(train_text.count(f"row {i}:") + val_text.count(f"row {i}:") for i in range(200)) == 200
    assert 0.1 < val_text.count("row ") / 200 < 0.4
    again = load_data(cfg)
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
    with pytest.raises(ConfigError, match="hf_text_field='text' is not a column.*body"):
        load_data(DataConfig(source="hf", path=str(tmp_path / "ds")))
    with pytest.raises(ConfigError, match="cannot open dataset"):
        load_data(DataConfig(source="hf", path=str(tmp_path / "nothing-here")))
