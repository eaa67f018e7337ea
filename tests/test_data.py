"""The data pipeline: corpus specs, synthetic tasks, the split, the token cache and batches."""

import json
import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llm.data import (
    DEFAULT_DATA,
    BatchSampler,
    Document,
    cache_key,
    default_corpus_files,
    documents_fingerprint,
    read_documents,
    synthetic_documents,
    tokenize_corpus,
    unigram_entropy,
    validation_batches,
)
from llm.tokenizer import ByteTokenizer, train_tokenizer
from tests.helpers import write

TOK = ByteTokenizer()


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def tokenize(documents, root, key="k", val_fraction=0.1, seed=0, tokenizer=TOK):
    return tokenize_corpus(documents, tokenizer, root, key, val_fraction=val_fraction, seed=seed)


def split_stream(tokens, mask=None):
    """The (token ids, mask) of each document in a packed stream, bos and eos included."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == TOK.bos_id).tolist() + [len(tokens)]
    return [(tokens[a:b].tolist(), None if mask is None else np.asarray(mask[a:b]).tolist())
            for a, b in zip(starts, starts[1:])]


def texts_of(tokens) -> list[str]:
    """The texts of the documents in a ByteTokenizer stream, in order."""
    docs = split_stream(tokens)
    assert all(ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id for ids, _ in docs)
    return [TOK.decode(ids[1:-1]) for ids, _ in docs]


# ----------------------------------------------------------------------------- the default corpus


def test_default_corpus_is_the_standard_library_source():
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500
    assert files == sorted(files)
    assert root / "os.py" in files
    assert all(f.suffix == ".py" and f.is_relative_to(root) for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.relative_to(root).parts)
                   for f in files)


def test_read_stdlib_is_one_document_per_source_file():
    documents = read_documents(DEFAULT_DATA)
    texts = {doc.text for doc in documents}
    assert len(documents) > 500
    assert (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text(encoding="utf-8") in texts
    assert all(doc.prompt_chars == 0 and doc.text.strip() for doc in documents)


# ----------------------------------------------------------------------------- spec kinds


@pytest.mark.parametrize("name", ["corpus.txt", "notes.md", "no_extension"])
def test_a_text_file_is_one_document(tmp_path, name):
    text = "line one\r\n  line two\n\nünïcödé 🐍\n"
    path = write(tmp_path / name, text)
    assert read_documents(str(path)) == [Document(text)]


def test_a_directory_is_every_text_file_under_it_sorted(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.py", "zed")
    write(tmp_path / "a" / "deeper" / "c.md", "sea")
    write(tmp_path / "a" / "records.jsonl", jsonl({"text": "from jsonl"}))
    write(tmp_path / "empty.txt", "  \n")  # no text: left out
    write(tmp_path / ".hidden.txt", "hidden file")
    write(tmp_path / ".git" / "config", "hidden directory")
    write(tmp_path / "image.bin", b"\x89PNG\0\0binary")
    documents = read_documents(str(tmp_path))
    # Sorted by path: a/deeper/c.md, a/records.jsonl, a/z.py, b.txt.
    assert [doc.text for doc in documents] == ["sea", "from jsonl", "zed", "bee"]


@pytest.mark.parametrize("pattern, expected", [
    ("*.txt", ["one", "two"]),
    ("**/*.txt", ["one", "two", "deep"]),  # sorted by path: 1.txt, 2.txt, sub/3.txt
    ("sub/*", ["deep", "other"]),
], ids=["star", "recursive-star-star", "directory-star"])
def test_a_glob_pattern_is_every_file_it_matches(tmp_path, pattern, expected):
    write(tmp_path / "1.txt", "one")
    write(tmp_path / "2.txt", "two")
    write(tmp_path / "sub" / "3.txt", "deep")
    write(tmp_path / "sub" / "4.md", "other")
    assert [doc.text for doc in read_documents(str(tmp_path / pattern))] == expected


def test_jsonl_with_text_fields(tmp_path):
    path = write(tmp_path / "data.jsonl", jsonl({"text": "first"}, {"text": "sec\nond", "id": 7})
                 + "\n" + jsonl({"text": "   "}, {"text": "third \u2028 line"}))
    assert read_documents(str(path)) == [Document("first"), Document("sec\nond"),
                                         Document("third \u2028 line")]


def test_jsonl_with_prompt_and_completion_fields(tmp_path):
    path = write(tmp_path / "qa.jsonl", jsonl({"prompt": "Q: 2+2?\nA:", "completion": " 4"},
                                              {"prompt": "Say hi: ", "completion": "hi 👋"}))
    assert read_documents(str(path)) == [Document("Q: 2+2?\nA: 4", prompt_chars=10),
                                         Document("Say hi: hi 👋", prompt_chars=8)]


def test_prompt_tokens_have_mask_zero_and_completion_tokens_mask_one(tmp_path):
    records = [{"prompt": f"question {i}: what is {i} + {i}?\n", "completion": f"{2 * i} é"}
               for i in range(20)]
    documents = read_documents(str(write(tmp_path / "qa.jsonl", jsonl(*records))))
    data = tokenize(documents, tmp_path / "cache")
    expected = {}
    for r in records:
        prompt, completion = TOK.encode(r["prompt"]), TOK.encode(r["completion"])
        expected[r["prompt"] + r["completion"]] = (
            [TOK.bos_id, *prompt, *completion, TOK.eos_id],
            [0] * (1 + len(prompt)) + [1] * (len(completion) + 1))
    seen = 0
    for tokens, mask in (data.train_tokens, data.train_mask), (data.val_tokens, data.val_mask):
        for ids, doc_mask in split_stream(tokens, mask):
            assert (ids, doc_mask) == expected[TOK.decode(ids)]
            seen += 1
    assert seen == len(records)


def test_plain_text_masks_only_bos(tmp_path):
    documents = [Document(f"document {i}\n") for i in range(10)]
    data = tokenize(documents, tmp_path)
    for ids, mask in split_stream(data.train_tokens, data.train_mask):
        assert mask == [0] + [1] * (len(ids) - 1)


def test_prompt_and_completion_are_encoded_apart_with_sentencepiece(tmp_path):
    # "ab" + "cd" would merge across the boundary if encoded together as "abcd".
    text = "abcd abcd abcd ab cd xx abcd\n" * 30 + "the quick brown fox jumps over the lazy dog\n"
    tokenizer = train_tokenizer([text * 20], 300)
    assert tokenizer.encode("abcd") != tokenizer.encode("ab") + tokenizer.encode("cd")
    documents = [Document("xx abcd", prompt_chars=5), Document("abcd abcd", prompt_chars=2)]
    data = tokenize(documents, tmp_path, tokenizer=tokenizer, val_fraction=0.5)
    streams = {tuple(np.asarray(data.train_tokens)): np.asarray(data.train_mask).tolist(),
               tuple(np.asarray(data.val_tokens)): np.asarray(data.val_mask).tolist()}
    for doc in documents:
        prompt = tokenizer.encode(doc.text[:doc.prompt_chars])
        completion = tokenizer.encode(doc.text[doc.prompt_chars:])
        ids = (tokenizer.bos_id, *prompt, *completion, tokenizer.eos_id)
        assert streams[ids] == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)


# ----------------------------------------------------------------------------- synthetic tasks


def check_mqar(doc: Document):
    prompt, answer = doc.text[:doc.prompt_chars], doc.text[doc.prompt_chars:]
    pairs_line, query_line = prompt.rstrip("\n").split("\n")
    pairs = dict(pair.split(":") for pair in pairs_line.split())
    assert query_line.startswith("? ")
    assert answer.split() == [pairs[key] for key in query_line[2:].split()]


def check_copy(doc: Document):
    prompt, answer = doc.text[:doc.prompt_chars], doc.text[doc.prompt_chars:]
    assert prompt == answer + "|" and answer.isalpha()


@pytest.mark.parametrize("name, check", [("mqar", check_mqar), ("copy", check_copy)],
                         ids=["mqar", "copy"])
def test_synthetic_tasks_are_short_correct_and_seeded(name, check):
    documents = synthetic_documents(name, n_documents=300, seed=1)
    for doc in documents:
        check(doc)
        assert len(doc.text) < 200 and 0 < doc.prompt_chars < len(doc.text)
    assert synthetic_documents(name, n_documents=300, seed=1) == documents
    assert synthetic_documents(name, n_documents=300, seed=2) != documents
    assert len({doc.text for doc in documents}) > 290
    assert read_documents(f"synthetic:{name}") == synthetic_documents(name)
    assert len(read_documents(f"synthetic:{name}")) == 4000


def numbered_documents(n: int) -> list[Document]:
    return [Document(f"<document {i:03d}>\n" + "word " * (i % 7)) for i in range(n)]


def test_split_is_by_document_disjoint_and_seeded(tmp_path):
    documents = numbered_documents(40)
    data = tokenize(documents, tmp_path / "a", val_fraction=0.1, seed=3)
    train, val = texts_of(data.train_tokens), texts_of(data.val_tokens)
    assert (data.n_train_documents, data.n_val_documents) == (36, 4) == (len(train), len(val))
    assert sorted(train + val) == sorted(doc.text for doc in documents)
    train_bytes = bytes(np.asarray(data.train_tokens).astype(np.uint8))
    assert not any(text.encode() in train_bytes for text in val)

    again = tokenize(documents, tmp_path / "b", val_fraction=0.1, seed=3)
    assert np.array_equal(again.train_tokens, data.train_tokens)
    assert np.array_equal(again.val_tokens, data.val_tokens)
    other = tokenize(documents, tmp_path / "c", val_fraction=0.1, seed=4)
    assert set(texts_of(other.val_tokens)) != set(val)


@pytest.mark.parametrize("n, val_fraction, n_val", [(2, 0.01, 1), (3, 0.9, 2), (20, 0.05, 1),
                                                    (200, 0.05, 10)])
def test_validation_has_at_least_one_document_and_train_keeps_one(tmp_path, n, val_fraction,
                                                                  n_val):
    data = tokenize(numbered_documents(n), tmp_path, val_fraction=val_fraction)
    assert (data.n_train_documents, data.n_val_documents) == (n - n_val, n_val)
    assert len(texts_of(data.val_tokens)) == n_val


def test_one_document_is_cut_at_the_line_nearest_the_fraction(tmp_path):
    text = "".join(f"line {i:02d}\n" for i in range(20))  # 8 characters a line
    data = tokenize([Document(text)], tmp_path, val_fraction=0.1)
    [train], [val] = texts_of(data.train_tokens), texts_of(data.val_tokens)
    assert train + val == text
    assert val == "line 18\nline 19\n"
    assert (data.n_train_documents, data.n_val_documents) == (1, 1)


def test_one_document_without_newlines_is_cut_at_the_fraction(tmp_path):
    data = tokenize([Document("abcdefghij")], tmp_path, val_fraction=0.2)
    assert (texts_of(data.train_tokens), texts_of(data.val_tokens)) == (["abcdefgh"], ["ij"])


def test_one_prompt_completion_document_keeps_its_prompt_masked(tmp_path):
    doc = Document("prompt line\nmore prompt\nanswer\n", prompt_chars=24)
    data = tokenize([doc], tmp_path, val_fraction=0.3)
    [(train_ids, train_mask)] = split_stream(data.train_tokens, data.train_mask)
    [(val_ids, val_mask)] = split_stream(data.val_tokens, data.val_mask)
    # All prompt: only the eos that ends the piece counts.
    assert TOK.decode(train_ids) == "prompt line\nmore prompt\n"
    assert train_mask == [0] * (len(train_ids) - 1) + [1]
    assert TOK.decode(val_ids) == "answer\n" and val_mask == [0] + [1] * 8


# ----------------------------------------------------------------------------- the cache


def test_cache_is_written_completely_and_reused(tmp_path):
    documents = numbered_documents(30)
    first = tokenize(documents, tmp_path, key="abc")
    cache = tmp_path / "abc"
    assert first.cache_dir == cache
    assert sorted(p.name for p in cache.iterdir()) == [
        "meta.json", "train.bin", "train.mask.bin", "val.bin", "val.mask.bin"]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["key"] == "abc"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(first.train_tokens),
                                                          len(first.val_tokens))
    assert isinstance(first.train_tokens, np.memmap) and first.train_tokens.dtype == np.uint16
    assert first.train_mask.dtype == np.uint8 and not first.train_tokens.flags.writeable
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in cache.iterdir()}

    second = tokenize(documents, tmp_path, key="abc")
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in cache.iterdir()} == before
    for name in ("train_tokens", "train_mask", "val_tokens", "val_mask"):
        assert np.array_equal(getattr(second, name), getattr(first, name))


def test_another_key_makes_another_cache(tmp_path):
    documents = numbered_documents(10)
    a, b = tokenize(documents, tmp_path, key="one"), tokenize(documents, tmp_path, key="two")
    assert a.cache_dir != b.cache_dir
    assert (tmp_path / "one" / "meta.json").is_file() and (tmp_path / "two" / "meta.json").is_file()


@pytest.mark.parametrize("damage", [
    lambda cache: (cache / "meta.json").unlink(),
    lambda cache: (cache / "meta.json").write_text("{not json"),
    lambda cache: (cache / "train.bin").write_bytes((cache / "train.bin").read_bytes()[:-4]),
    lambda cache: (cache / "val.mask.bin").unlink(),
], ids=["meta-missing", "meta-garbled", "tokens-truncated", "mask-missing"])
def test_a_half_written_cache_is_rebuilt(tmp_path, damage):
    documents = numbered_documents(10)
    first = tokenize(documents, tmp_path)
    expected = {name: np.array(getattr(first, name))
                for name in ("train_tokens", "train_mask", "val_tokens", "val_mask")}
    del first  # let go of the memory maps before damaging the files
    damage(tmp_path / "k")
    rebuilt = tokenize(documents, tmp_path)
    assert (tmp_path / "k" / "meta.json").is_file()
    for name, array in expected.items():
        assert np.array_equal(getattr(rebuilt, name), array)
    assert not [p.name for p in (tmp_path / "k").iterdir() if p.name.startswith(".")]


def test_settings_that_do_not_match_the_cache_rebuild_it(tmp_path):
    documents = numbered_documents(20)
    tokenize(documents, tmp_path, seed=0)
    other = tokenize(documents, tmp_path, seed=1)  # same key, other seed: a caller's mistake
    assert json.loads((tmp_path / "k" / "meta.json").read_text())["seed"] == 1
    assert other.n_val_documents == 2


def test_cache_key_changes_with_everything_that_changes_the_tokens():
    spm = train_tokenizer(["some text to learn a few pieces from\n" * 20], 280)
    base = dict(spec="data.txt", tokenizer=TOK, val_fraction=0.05, seed=0,
                documents_fingerprint="f" * 64)
    key = cache_key(**base)
    assert re.fullmatch(r"[0-9a-f]{16}", key) and cache_key(**base) == key
    changes = [{"spec": "other.txt"}, {"tokenizer": spm}, {"val_fraction": 0.1}, {"seed": 1},
               {"documents_fingerprint": "e" * 64}]
    keys = {cache_key(**{**base, **change}) for change in changes}
    assert len(keys) == len(changes) and key not in keys
    assert cache_key(**{**base, "tokenizer": ByteTokenizer()}) == key


def test_documents_fingerprint_sees_texts_boundaries_and_prompts():
    base = documents_fingerprint([Document("ab"), Document("c")])
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert documents_fingerprint([Document("ab"), Document("c")]) == base
    assert documents_fingerprint([Document("a"), Document("bc")]) != base
    assert documents_fingerprint([Document("ab", prompt_chars=1), Document("c")]) != base
    assert documents_fingerprint([Document("c"), Document("ab")]) != base


# ----------------------------------------------------------------------------- batches


def counting_stream(n: int):
    """Token i is i (mod 65536), so a window's first token says where it starts."""
    tokens = np.arange(n, dtype=np.uint16)
    mask = (np.arange(n) % 3 != 0).astype(np.uint8)
    return tokens, mask


def test_batches_are_windows_with_targets_shifted_by_one():
    tokens, mask = counting_stream(1000)
    inputs, targets, weights = BatchSampler(tokens, mask, seq_len=16, batch_size=4,
                                            seed=0).next_batch()
    assert (inputs.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
    assert inputs.shape == targets.shape == weights.shape == (4, 16)
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])
    for row in range(4):
        start = int(inputs[row, 0])
        assert start % 16 == 0
        assert np.array_equal(inputs[row], np.arange(start, start + 16))
        assert np.array_equal(targets[row], np.arange(start + 1, start + 17))
        assert np.array_equal(weights[row], mask[start + 1:start + 17])


def test_without_a_mask_every_token_counts():
    tokens, _ = counting_stream(100)
    _, _, weights = BatchSampler(tokens, None, seq_len=8, batch_size=2, seed=0).next_batch()
    assert np.array_equal(weights, np.ones((2, 8), np.float32))


def batch_starts(sampler, n_batches):
    return [int(s) for _ in range(n_batches) for s in sampler.next_batch()[0][:, 0]]


def test_order_is_seeded():
    tokens, mask = counting_stream(2000)
    first = batch_starts(BatchSampler(tokens, mask, 10, 8, seed=0), 5)
    assert batch_starts(BatchSampler(tokens, mask, 10, 8, seed=0), 5) == first
    assert batch_starts(BatchSampler(tokens, mask, 10, 8, seed=1), 5) != first


def test_every_window_once_per_epoch_across_epoch_boundaries():
    tokens, mask = counting_stream(7 * 10 + 5)  # 7 windows of 10 (+1) tokens, a ragged tail
    sampler = BatchSampler(tokens, mask, seq_len=10, batch_size=3, seed=0)
    assert sampler.windows_per_epoch == 7
    starts = batch_starts(sampler, 7)  # 21 windows: exactly three epochs
    epochs = [starts[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(epoch) == list(range(0, 70, 10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each epoch is reshuffled
    assert sampler.state_dict()["epoch"] == 3 and sampler.state_dict()["index"] == 0


@pytest.mark.parametrize("saved_after", [0, 1, 2, 5], ids=lambda n: f"after-{n}-batches")
def test_restoring_state_into_a_new_sampler_continues_exactly(saved_after):
    tokens, mask = counting_stream(7 * 10 + 1)
    sampler = BatchSampler(tokens, mask, seq_len=10, batch_size=3, seed=5)
    for _ in range(saved_after):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint stores it
    expected = [sampler.next_batch() for _ in range(10)]  # 30 windows: crosses epochs

    restored = BatchSampler(tokens, mask, seq_len=10, batch_size=3, seed=5)
    restored.load_state_dict(state)
    for batch, want in zip((restored.next_batch() for _ in range(10)), expected):
        for got, array in zip(batch, want):
            assert np.array_equal(got, array)
    assert restored.state_dict() == sampler.state_dict()


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "seed=1"), ({"seq_len": 5}, "seq_len=5"), ({"index": 7}, r"index in \[0, 7\)"),
], ids=["other-seed", "other-seq-len", "index-out-of-range"])
def test_restoring_a_state_for_other_settings_fails(change, message):
    tokens, mask = counting_stream(71)
    sampler = BatchSampler(tokens, mask, seq_len=10, batch_size=3, seed=0)
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict({**sampler.state_dict(), **change})


@pytest.mark.parametrize("n_tokens, seq_len", [(10, 10), (1, 4)], ids=["one-short", "tiny"])
def test_a_stream_too_short_for_one_window_fails_suggesting_a_smaller_seq_len(n_tokens, seq_len):
    tokens, mask = counting_stream(n_tokens)
    with pytest.raises(ValueError, match=rf"has {n_tokens} tokens.*needs {seq_len + 1}.*--seq-len"):
        BatchSampler(tokens, mask, seq_len=seq_len, batch_size=2, seed=0)


def test_validation_windows_spread_over_the_whole_stream():
    """More windows than asked for: evenly spaced from the first token to the last, at least a
    window apart, the same at every call."""
    tokens, mask = counting_stream(1000 * 10 + 1)  # 1000 windows
    batches = validation_batches(tokens, mask, seq_len=10, batch_size=4, max_batches=3)
    assert [len(b[0]) for b in batches] == [4, 4, 4]
    starts = [int(s) for inputs, _, _ in batches for s in inputs[:, 0]]
    assert starts[0] == 0 and starts[-1] == len(tokens) - 1 - 10
    gaps = np.diff(starts)
    assert gaps.min() >= 10 and gaps.max() - gaps.min() <= 1
    again = validation_batches(tokens, mask, seq_len=10, batch_size=4, max_batches=3)
    for batch, same in zip(batches, again):
        assert all(np.array_equal(a, b) for a, b in zip(batch, same))
    inputs, targets, weights = batches[1]
    assert np.array_equal(targets, inputs + 1)
    assert np.array_equal(weights[0], mask[inputs[0, 0] + 1:inputs[0, 0] + 11])


def test_validation_batches_take_every_window_when_there_are_few():
    tokens, mask = counting_stream(10 * 10 + 1)  # 10 windows
    batches = validation_batches(tokens, mask, seq_len=10, batch_size=4, max_batches=5)
    again = validation_batches(tokens, mask, seq_len=10, batch_size=4, max_batches=5)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    for batch, same in zip(batches, again):
        assert all(np.array_equal(a, b) for a, b in zip(batch, same))
    starts = [int(s) for inputs, _, _ in batches for s in inputs[:, 0]]
    assert starts == list(range(0, 100, 10))
    inputs, targets, weights = batches[0]
    assert np.array_equal(targets, inputs + 1)
    assert np.array_equal(weights[0], mask[1:11])
    limited = validation_batches(tokens, mask, seq_len=10, batch_size=4, max_batches=2)
    assert [len(b[0]) for b in limited] == [4, 4]


def test_a_short_validation_stream_is_one_shorter_window():
    tokens, mask = counting_stream(6)
    [(inputs, targets, weights)] = validation_batches(tokens, mask, seq_len=64, batch_size=8,
                                                      max_batches=3)
    assert inputs.tolist() == [[0, 1, 2, 3, 4]] and targets.tolist() == [[1, 2, 3, 4, 5]]
    assert weights.tolist() == [mask[1:].tolist()]


def test_an_empty_validation_stream_fails():
    tokens, mask = counting_stream(1)
    with pytest.raises(ValueError, match="validation split is empty"):
        validation_batches(tokens, mask, seq_len=8, batch_size=2, max_batches=1)


def test_cached_streams_feed_the_samplers(tmp_path):
    data = tokenize(synthetic_documents("copy", n_documents=200), tmp_path)
    sampler = BatchSampler(data.train_tokens, data.train_mask, seq_len=32, batch_size=4, seed=0)
    inputs, targets, weights = sampler.next_batch()
    assert inputs.shape == (4, 32) and 0 < weights.mean() < 1
    assert validation_batches(data.val_tokens, data.val_mask, 32, 4, 2)[0][0].shape == (4, 32)


# ----------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("k", [1, 2, 7, 258])
def test_unigram_entropy_of_a_uniform_stream_is_log_k(k):
    tokens = np.tile(np.arange(k, dtype=np.uint16), 5)
    assert unigram_entropy(tokens, 258) == pytest.approx(math.log(k), abs=1e-12)


def test_unigram_entropy_of_a_skewed_stream():
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy(np.array([0, 3, 0, 0], np.uint16), 4) == pytest.approx(expected)


@pytest.mark.parametrize("tokens, message", [
    (np.array([], np.uint16), "tokens is empty"),
    (np.array([1, 4], np.uint16), r"in \[0, vocab_size=4\), got 4"),
], ids=["empty", "out-of-range"])
def test_unigram_entropy_rejects_bad_tokens(tokens, message):
    with pytest.raises(ValueError, match=message):
        unigram_entropy(tokens, 4)
