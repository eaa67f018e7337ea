"""Tokenizers round-trip any text exactly, save and load, train repeatably and stream."""

import base64
import json
import random

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    StreamingDetokenizer,
    load_tokenizer,
    train_tokenizer,
)

VOCAB_SIZE = 600
# Only in the one line longer than SentencePiece's sentence limit: it is learned only if long
# lines are cut into pieces instead of skipped.
LONG_LINE_WORD = "zqxjvkw"

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "chinese": "机器学习是人工智能的一个分支。",
    "japanese": "東京は日本の首都です。カタカナとひらがな",
    "korean": "안녕하세요, 세계!",
    "arabic": "مرحبا بالعالم، هذه جملة عربية.",
    "hebrew": "שלום עולם",
    "hindi": "नमस्ते दुनिया, यह हिंदी है।",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "thai": "สวัสดีชาวโลก",
    "emoji": "I ❤️ 🐍 and 🚀🔥!",
    "emoji-zwj": "👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈",
    "emoji-skin-tones": "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "flags": "🇯🇵🇫🇷🇧🇷",
    "code": "def f(x):\n\tif x:\n\t\treturn x  \n    pass\n\n\nclass A:\n    y = [1, 2]\t# note\n",
    "tabs-and-spaces": "\t \t  x  \t\n \t",
    "trailing-spaces": "line   \nnext  ",
    "leading-spaces": "   starts with spaces",
    "multiple-spaces": "a     b      c",
    "only-spaces": "    ",
    "newlines": "\n\n\na\n\n",
    "crlf": "windows\r\nline\r\n",
    "control-chars": "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x0b\x0c\x1c\x85",
    "empty": "",
    "digits": "3.14159 2718281828 0x1F 1e-9",
    "combining": "e\u0301 vs \u00e9, A\u030a vs \u00c5",
    "fullwidth": "ＡＢＣ\u3000１２３ ﬁ ①",
    "invisible": "\ufeffbom\u200bzero\u200dwidth\u200f\u202e",
    "space-symbol": "a\u2581b \u2581 \u2581\u2581",
    "replacement-char": "\ufffd\ufffd after \ufffd中 \ufffd🙂",
}

ENGLISH_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which "
    "model state attention power retention token sequence memory layer training data value "
    "query key head chunk linear time cost grows length context window fast slow small large"
).split()

MULTILINGUAL = [
    "机器学习是人工智能的一个分支。今天天气很好。",
    "Привет, мир! Это предложение на русском языке.",
    "Γειά σου Κόσμε, αυτή είναι μια ελληνική πρόταση.",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "Ça va? Größe, naïve café, déjà vu — ñandú.",
    "日本語の文章です。カタカナもあります。",
]

CODE_TEMPLATE = '''def {name}(x, y={n}):
    """Return {name} of x."""
    if x > {n}:
\treturn x * y  
    for i in range(len(x)):
        total += x[i] ** 2
    return {{"{name}": total, "n": {n}}}

'''


def make_corpus(seed=0, n_lines=300):
    """Documents: English prose, Python code, other scripts and one very long line."""
    rng = random.Random(seed)
    words = lambda: " ".join(rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(5, 15)))
    prose = [words().capitalize() + "." for _ in range(n_lines)]
    code = [CODE_TEMPLATE.format(name=rng.choice(ENGLISH_WORDS) + "_" + rng.choice(ENGLISH_WORDS),
                                 n=rng.randint(0, 999)) for _ in range(n_lines // 10)]
    other = [rng.choice(MULTILINGUAL) for _ in range(n_lines // 3)]
    long_line = " ".join([LONG_LINE_WORD] * 1000)  # 8000 bytes, no line break
    return ["\n".join(prose), "".join(code), "\n".join(other), long_line]


@pytest.fixture(scope="module")
def sp_tokenizer():
    return train_tokenizer(make_corpus(), VOCAB_SIZE)


@pytest.fixture(params=["byte", "sentencepiece"])
def tokenizer(request, sp_tokenizer):
    return ByteTokenizer() if request.param == "byte" else sp_tokenizer


def stream(tokenizer, ids):
    """The segments a StreamingDetokenizer gives: one read after each id, one after finalize."""
    detokenizer = StreamingDetokenizer(tokenizer)
    segments = []
    for i in ids:
        detokenizer.add_token(i)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert detokenizer.text == "".join(segments)
    return segments


# Round trips

@pytest.mark.parametrize("text", SAMPLES.values(), ids=SAMPLES.keys())
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text, add_bos=True)
    assert with_bos == [tokenizer.bos_id] + ids
    assert tokenizer.decode(with_bos + [tokenizer.eos_id]) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(sp_tokenizer, text):
    for tokenizer in (ByteTokenizer(), sp_tokenizer):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_tokenizer_ids():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id) == (258, 256, 257)
    assert tokenizer.encode("aé") == [97, 0xC3, 0xA9]
    assert tokenizer.encode("aé", add_bos=True) == [257, 97, 0xC3, 0xA9]
    assert tokenizer.encode("") == []
    assert tokenizer.decode([257, 104, 105, 256]) == "hi"
    assert tokenizer.decode([0xFF, 0x41, 0xE4, 0xB8]) == "\ufffdA\ufffd"  # invalid bytes
    assert tokenizer.decode(np.array([104, 105])) == "hi"
    assert tokenizer.decode(mx.array([104, 105])) == "hi"


def test_sentencepiece_ids(sp_tokenizer):
    assert (sp_tokenizer.vocab_size, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (VOCAB_SIZE, 1, 2)
    assert sp_tokenizer.encode("") == []
    assert sp_tokenizer.encode("", add_bos=True) == [1]
    # Unknown pieces never come out of encode (byte fallback); decoded they are U+FFFD.
    assert sp_tokenizer.decode([0]) == "\ufffd"
    ids = sp_tokenizer.encode("hello")
    assert sp_tokenizer.decode(np.array(ids)) == sp_tokenizer.decode(mx.array(ids)) == "hello"


def test_sentencepiece_learned_the_corpus(sp_tokenizer):
    # Fewer tokens than bytes for prose and code (newlines and indentation included); the
    # word that appears only in the 8000-byte line was learned too.
    english = "The model state grows with the length of the context."
    code = "    for i in range(len(x)):\n        total += x[i] ** 2\n    return total\n"
    assert len(sp_tokenizer.encode(english)) < 0.4 * len(english.encode())
    assert len(sp_tokenizer.encode(code)) < 0.6 * len(code.encode())
    # Line breaks are pieces of their own, not byte fallback (ids 3..258 are the bytes).
    assert len(sp_tokenizer.encode("\n")) == 1 and sp_tokenizer.encode("\n")[0] >= 259
    assert len(sp_tokenizer.encode(LONG_LINE_WORD)) <= 2
    # Characters outside the vocabulary become bytes, one token each.
    assert len(sp_tokenizer.encode("\U0001F9EA")) == 4


@pytest.mark.parametrize("text", ["  hello  foo\n\tbar", SAMPLES["code"], SAMPLES["emoji-zwj"]],
                         ids=["spaces", "code", "emoji-zwj"])
def test_sentencepiece_decodes_in_slices(sp_tokenizer, text):
    # No dummy prefix: a slice's leading space is kept, so slices concatenate to the whole
    # (wherever the cut is not inside a character, i.e. no slice shows U+FFFD).
    ids = sp_tokenizer.encode(text)
    cuts = 0
    for k in range(len(ids) + 1):
        head, tail = sp_tokenizer.decode(ids[:k]), sp_tokenizer.decode(ids[k:])
        if "\ufffd" not in head + tail:
            assert head + tail == text
            cuts += 1
    assert cuts >= 3


# Save and load

def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["power_retention"] == {"tokenizer": "byte", "vocab_size": 258, "bos_id": 257, "eos_id": 256}
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert all(loaded.encode(t) == ByteTokenizer().encode(t) for t in SAMPLES.values())


def test_a_tokenizer_saved_before_the_hugging_face_files_loads(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "byte", "vocab_size": 258, "bos_id": 257, "eos_id": 256}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_sentencepiece_save_load(tmp_path, sp_tokenizer):
    directory = tmp_path / "nested" / "tok"
    sp_tokenizer.save(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer.model",
                                                           "tokenizer_config.json"]
    config = json.loads((directory / "tokenizer_config.json").read_text())["power_retention"]
    assert config == {"tokenizer": "sentencepiece", "vocab_size": VOCAB_SIZE, "bos_id": 1,
                      "eos_id": 2, "model_proto": base64.b64encode(sp_tokenizer.model_proto).decode()}
    assert (directory / "tokenizer.model").read_bytes() == sp_tokenizer.model_proto
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (VOCAB_SIZE, 1, 2)
    for text in SAMPLES.values():
        assert loaded.encode(text, add_bos=True) == sp_tokenizer.encode(text, add_bos=True)
    # The model lives in memory: the file can go; the config's copy loads without it.
    (directory / "tokenizer.model").unlink()
    assert loaded.decode(loaded.encode(SAMPLES["hindi"])) == SAMPLES["hindi"]
    assert load_tokenizer(directory).encode(SAMPLES["hindi"]) == loaded.encode(SAMPLES["hindi"])


def test_a_config_that_disagrees_with_the_model_is_named(tmp_path, sp_tokenizer):
    sp_tokenizer.save(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["power_retention"]["vocab_size"] = 1000
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"json says vocab_size=1000 but the tokenizer has 600"):
        load_tokenizer(tmp_path)


# Training

def test_train_from_files_same_as_texts_quietly_and_leaves_no_files(tmp_path, monkeypatch, capfd):
    corpus = make_corpus(seed=1, n_lines=100)
    paths = []
    for k, document in enumerate(corpus):
        paths.append(tmp_path / f"doc{k}.txt")
        paths[-1].write_text(document, encoding="utf-8")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    from_files = train_tokenizer(paths, 500)
    from_texts = train_tokenizer(iter(corpus), 500)  # a generator works too
    assert from_files.model_proto == from_texts.model_proto
    assert list(workdir.iterdir()) == []
    assert capfd.readouterr() == ("", "")  # SentencePiece's training log is off


def test_training_is_seeded():
    corpus = make_corpus(seed=2, n_lines=300)
    first = train_tokenizer(corpus, 500, max_sentences=80, seed=0)
    again = train_tokenizer(corpus, 500, max_sentences=80, seed=0)
    other = train_tokenizer(corpus, 500, max_sentences=80, seed=1)
    assert first.model_proto == again.model_proto
    assert first.model_proto != other.model_proto


def test_unigram_round_trip():
    tokenizer = train_tokenizer(make_corpus(seed=3, n_lines=100), 500, model_type="unigram")
    assert tokenizer.vocab_size == 500
    for text in SAMPLES.values():
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_minimum_vocab_size():
    # 'ab cab' has 4 characters (a, b, c, space): 256 bytes + unk, bos, eos + 4 = 263.
    with pytest.raises(ValueError, match=r"vocab_size=262 is too small .* 4 characters .* >= 263"):
        train_tokenizer(["ab cab"] * 10, 262)
    tokenizer = train_tokenizer(["ab cab"] * 10, 263)
    assert tokenizer.vocab_size == 263
    assert tokenizer.decode(tokenizer.encode("cab ba, 中")) == "cab ba, 中"
    with pytest.raises(ValueError, match=r"vocab_size=400 is more pieces than bpe finds in this "
                                         r"text: use vocab_size <= \d+"):
        train_tokenizer(["ab cab"] * 10, 400)


BAD_CALLS = {
    "encode-bytes": (lambda t: t.encode(b"text"), r"text must be a str, got bytes"),
    "encode-none": (lambda t: t.encode(None), r"text must be a str, got NoneType"),
    "encode-surrogate": (lambda t: t.encode("a\ud800b"), r"text must be valid Unicode"),
    "decode-too-large": (lambda t: t.decode([1, t.vocab_size]), r"ids must be in \[0, \d+\), got"),
    "decode-negative": (lambda t: t.decode([-1]), r"ids must be in \[0, \d+\), got -1"),
    "decode-str": (lambda t: t.decode("abc"), r"ids must be an iterable of integers"),
    "decode-floats": (lambda t: t.decode([1.0]), r"ids must be an iterable of integers"),
    "decode-none": (lambda t: t.decode(None), r"ids must be an iterable of integers"),
}


@pytest.mark.parametrize("call, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_calls(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


def test_bad_model_proto(sp_tokenizer):
    with pytest.raises(ValueError, match=r"model_proto is not a serialized SentencePiece model"):
        SentencePieceTokenizer(b"garbage")
    with pytest.raises(ValueError, match=r"model_proto must be the bytes .* got str"):
        SentencePieceTokenizer("tokenizer.model")
    copy = SentencePieceTokenizer(bytearray(sp_tokenizer.model_proto))
    assert copy.encode("hi") == sp_tokenizer.encode("hi")


# Streaming

@pytest.mark.parametrize("text", SAMPLES.values(), ids=SAMPLES.keys())
def test_streaming_matches_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_bos=True) + [tokenizer.eos_id]
    segments = stream(tokenizer, ids)
    assert "".join(segments) == tokenizer.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in segment for segment in segments)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_streaming_matches_decode_any_text(sp_tokenizer, text):
    for tokenizer in (ByteTokenizer(), sp_tokenizer):
        segments = stream(tokenizer, tokenizer.encode(text))
        assert "".join(segments) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in segment for segment in segments)


def test_streaming_holds_back_partial_characters():
    tokenizer = ByteTokenizer()
    # Each character is emitted with its last byte, not before.
    assert stream(tokenizer, tokenizer.encode("a中b🙂")) == ["a", "", "", "中", "b", "", "", "", "🙂", ""]
    # A real U+FFFD followed by a character in bytes: neither is split.
    assert stream(tokenizer, tokenizer.encode("\ufffd中")) == ["", "", "", "\ufffd", "", "中", ""]
    # Bytes that never make a character: after 4 held tokens the oldest is given up on.
    assert stream(tokenizer, [0xFF] * 6) == ["", "", "", "\ufffd", "\ufffd", "\ufffd", "\ufffd" * 3]
    # An unfinished character at the end comes out at finalize().
    assert stream(tokenizer, [0x61, 0xE4, 0xB8]) == ["a", "", "", "\ufffd"]


def test_streaming_emits_as_it_goes(sp_tokenizer):
    text = SAMPLES["english"] + " " + SAMPLES["code"]
    ids = sp_tokenizer.encode(text)
    segments = stream(sp_tokenizer, ids)
    assert segments[-1] == ""  # nothing was held back: all ASCII
    assert sum(1 for s in segments if s) == len(ids)


class CountingByteTokenizer(ByteTokenizer):
    """Counts the ids it decodes, to measure the streaming cost."""

    decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def test_streaming_is_linear_time():
    tokenizer = CountingByteTokenizer()
    ids = tokenizer.encode("".join(SAMPLES.values()) * 20)
    segments = stream(tokenizer, ids)
    assert "".join(segments) == ByteTokenizer().decode(ids)
    assert tokenizer.decoded <= 4 * len(ids)


def test_streaming_text_and_reset():
    tokenizer = ByteTokenizer()
    detokenizer = StreamingDetokenizer(tokenizer)
    for i in tokenizer.encode("héllo"):
        detokenizer.add_token(i)
    assert detokenizer.text == "héllo"
    assert detokenizer.last_segment == "héllo"
    assert detokenizer.last_segment == ""
    detokenizer.add_token(0xE4)
    assert detokenizer.text == "héllo"  # held back
    detokenizer.finalize()
    assert detokenizer.text == "héllo\ufffd"
    detokenizer.reset()
    assert (detokenizer.text, detokenizer.last_segment) == ("", "")
    detokenizer.add_token(ord("x"))
    assert detokenizer.text == "x"


def test_streaming_ignores_special_ids_inside_a_character():
    tokenizer = ByteTokenizer()
    ids = [0xF0, tokenizer.bos_id, 0x9F, 0x8E, tokenizer.eos_id, 0x89]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == "\U0001F389"
