"""Tokenizers: raw UTF-8 bytes, or a SentencePiece model trained here.

    tok = ByteTokenizer()                                  # no training, 258 ids
    tok = train_tokenizer(["some text", ...], 4096)        # or [Path("corpus.txt"), ...]
    ids = tok.encode(text, add_bos=True)
    tok.save("out/tokenizer"); tok = load_tokenizer("out/tokenizer")

Both round-trip every str exactly, decode(encode(s)) == s: whitespace, newlines, control
characters and any script included. SentencePiece gets there with byte fallback (a character
outside the vocabulary becomes its UTF-8 bytes, one token each) and with every normalization
turned off. StreamingDetokenizer turns generated ids back into text one token at a time.
"""

from __future__ import annotations

import base64
import io
import json
import operator
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from power_retention.validation import check_integer, is_integer

from .hf_tokenizer import byte_tokenizer_json, sentencepiece_tokenizer_json, special_tokens

CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"

# Special ids of trained SentencePiece models. There is no pad id: batches are packed.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# 256 byte pieces and unk, bos, eos are always in the vocabulary; training needs at least one
# more piece (a character of the text), and one per character that covers CHARACTER_COVERAGE.
MIN_VOCAB_SIZE = 256 + 3 + 1
# Characters rarer than this leave the vocabulary to byte fallback (SentencePiece's default).
CHARACTER_COVERAGE = 0.9995
# SentencePiece silently skips longer training sentences, so longer lines are cut to this.
MAX_SENTENCE_BYTES = 4096
# A UTF-8 character is at most 4 bytes, so an unfinished one is at most 3 byte tokens.
MAX_CHAR_TOKENS = 4
# SentencePiece writes spaces as this meta symbol, so a literal one would decode as a space.
_SPACE_SYMBOL = "\u2581"


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256 ends a document, 257 begins one."""

    eos_id = 256
    bos_id = 257
    vocab_size = 258

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(_utf8(text))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size)
        # A model can generate any byte sequence; invalid UTF-8 still has to become text.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory) -> None:
        _write_config(directory, "byte", self)


class SentencePieceTokenizer:
    """A SentencePiece model, held as its serialized bytes (no file has to stay around).

    decode() of consecutive slices concatenates to decode() of the whole, which streaming
    relies on; that holds for models trained by train_tokenizer (no dummy prefix).
    """

    def __init__(self, model_proto: bytes):
        if not isinstance(model_proto, (bytes, bytearray)):
            raise ValueError("model_proto must be the bytes of a serialized SentencePiece model, "
                             f"got {type(model_proto).__name__} (read a file with load_tokenizer)")
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except RuntimeError:
            raise ValueError("model_proto is not a serialized SentencePiece model") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("model_proto: the SentencePiece model needs bos and eos pieces")
        # A literal meta symbol in the text is encoded as its UTF-8 bytes so that it decodes
        # to itself; models without byte pieces cannot, and get SentencePiece's behaviour.
        space_symbol = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]
        self._space_symbol_ids = space_symbol if all(map(self._sp.is_byte, space_symbol)) else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        _check_text(text)
        try:
            if self._space_symbol_ids and _SPACE_SYMBOL in text:
                ids = []
                for k, part in enumerate(text.split(_SPACE_SYMBOL)):
                    if k:
                        ids += self._space_symbol_ids
                    ids += self._sp.encode(part)
            else:
                ids = self._sp.encode(text)
        except RuntimeError:
            _utf8(text)  # the likely cause: a lone surrogate, which SentencePiece cannot take
            raise
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        # Control pieces (bos, eos) decode to nothing, unknown ones to U+FFFD (see training).
        return self._sp.decode(_check_ids(ids, self.vocab_size))

    def save(self, directory) -> None:
        _write_config(directory, "sentencepiece", self)
        (Path(directory) / MODEL_FILE).write_bytes(self.model_proto)


def load_tokenizer(directory) -> ByteTokenizer | SentencePieceTokenizer:
    """The tokenizer that ``save(directory)`` wrote."""
    config_path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # This project's block (Hugging Face's file around it), or the older file of ours alone.
        config = config.get("power_retention") or {**config, "tokenizer": config["tokenizer_class"]}
        kind = config["tokenizer"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer in {directory}: {config_path} does not exist") \
            from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{config_path} is not a tokenizer config "
                         f"({type(error).__name__}: {error})") from None
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        model_path = Path(directory) / MODEL_FILE
        if model_path.is_file():
            source, proto = model_path, model_path.read_bytes()
        elif isinstance(config.get("model_proto"), str):
            source, proto = f"{config_path} (model_proto)", base64.b64decode(config["model_proto"])
        else:
            raise FileNotFoundError(f"{config_path} names a SentencePiece tokenizer but "
                                    f"{model_path} does not exist")
        try:
            tokenizer = SentencePieceTokenizer(proto)
        except ValueError:
            raise ValueError(f"{source} is not a serialized SentencePiece model") from None
    else:
        raise ValueError(f"{config_path}: unknown tokenizer {kind!r} "
                         "(expected 'byte' or 'sentencepiece')")
    # A config edited by hand, or left from another tokenizer, would mislabel every id.
    for key in ("vocab_size", "bos_id", "eos_id"):
        if key in config and config[key] != getattr(tokenizer, key):
            raise ValueError(f"{config_path} says {key}={config[key]!r} but the tokenizer has "
                             f"{getattr(tokenizer, key)}")
    return tokenizer


def train_tokenizer(inputs, vocab_size: int, *, model_type: str = "bpe",
                    max_sentences: int = 1_000_000, seed: int = 0) -> SentencePieceTokenizer:
    """Train a SentencePiece tokenizer of ``vocab_size`` pieces, in memory.

    inputs: files as ``os.PathLike`` (e.g. ``pathlib.Path``; read as UTF-8, undecodable bytes
        become U+FFFD) and/or texts as ``str``, in any iterable. A ``str`` is always text.
    vocab_size: at least 256 byte pieces + unk, bos, eos + one per character that covers
        99.95% of the text; the error says the exact minimum for the text given.
    model_type: "bpe" or "unigram".
    max_sentences: lines kept for training, a seeded uniform sample when there are more.
    seed: makes the sample (and SentencePiece's own sampling) repeatable.

    Ids: unk 0, bos 1, eos 2, then byte pieces and the learned pieces; no pad.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    check_integer("vocab_size", vocab_size, minimum=MIN_VOCAB_SIZE,
                  meaning="256 byte pieces, unk, bos, eos and at least one character")
    check_integer("max_sentences", max_sentences)
    if not is_integer(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")

    sentences = _reservoir_sample(_sentences(inputs), max_sentences, random.Random(seed))
    if not sentences:
        raise ValueError("inputs has no text to train on (every line is empty)")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type=model_type, vocab_size=vocab_size,
            character_coverage=CHARACTER_COVERAGE, byte_fallback=True,
            # Exact round trips: no Unicode normalization, spaces kept as they are, no space
            # added in front of the text (which would also break decoding in slices).
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, unk_surface="\ufffd",
            max_sentence_length=MAX_SENTENCE_BYTES, minloglevel=2,
        )
    except RuntimeError as error:
        raise _training_error(error, vocab_size, model_type) from None
    return SentencePieceTokenizer(model.getvalue())


class StreamingDetokenizer:
    """Text of generated ids as it becomes final, without splitting a character.

        detok = StreamingDetokenizer(tokenizer)
        for token in generate(...):
            detok.add_token(token)
            print(detok.last_segment, end="")
        detok.finalize()
        print(detok.last_segment)

    A character outside the vocabulary arrives as up to 4 byte tokens, and decoding only some
    of them gives U+FFFD; such a tail is held back until it decodes completely. Only that tail
    (at most 4 ids) is ever decoded again, so the cost per token is constant. The segments
    concatenate to ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        # bos and eos decode to nothing; held among the bytes of a character they would count
        # towards its 4 ids and split it.
        self._special = {tokenizer.bos_id, tokenizer.eos_id}
        self.reset()

    def reset(self) -> None:
        self._pending: list[int] = []  # ids not yet emitted
        self._segments: list[str] = []  # text emitted so far
        self._read = 0  # segments that last_segment has already returned

    def add_token(self, token: int) -> None:
        if token in self._special:
            return
        self._pending.append(token)
        text = self._decode(self._pending)
        if not text.endswith("\ufffd"):
            self._emit(text, len(self._pending))
        elif len(self._pending) >= MAX_CHAR_TOKENS:
            # More ids than one character has: the U+FFFD is real (in the text, or from invalid
            # bytes), but the last 3 ids may still be an unfinished character. Emit up to the
            # earliest split whose halves decode to the same text as the whole: a split inside a
            # character changes the text, except inside an unfinished one, which SentencePiece
            # decodes to one U+FFFD per byte either way.
            for keep in range(MAX_CHAR_TOKENS - 1, 0, -1):
                head = self._decode(self._pending[:-keep])
                if head + self._decode(self._pending[-keep:]) == text:
                    self._emit(head, len(self._pending) - keep)
                    return
            self._emit(text, len(self._pending))

    def finalize(self) -> None:
        """Emit what is held back: the ids have ended, so it will not be completed."""
        if self._pending:
            self._emit(self._decode(self._pending), len(self._pending))

    @property
    def last_segment(self) -> str:
        """Text that became final since the previous read."""
        segment = "".join(self._segments[self._read:])
        self._read = len(self._segments)
        return segment

    @property
    def text(self) -> str:
        """All text emitted so far (everything, after finalize())."""
        return "".join(self._segments)

    def _emit(self, text: str, n_ids: int) -> None:
        self._segments.append(text)
        del self._pending[:n_ids]


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")


def _utf8(text) -> bytes:
    _check_text(text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"text must be valid Unicode: {error}") from None


def _check_ids(ids, vocab_size: int) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy and mlx arrays
        ids = ids.tolist()
    try:
        ids = [operator.index(i) for i in ids]
    except TypeError:
        raise ValueError(f"ids must be an iterable of integers, got {ids!r:.80}") from None
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"ids must be in [0, {vocab_size}), got {bad}")
    return ids



def _write_config(directory, kind: str, tokenizer) -> None:
    """tokenizer.json and tokenizer_config.json in Hugging Face's format (what mlx-lm and
    AutoTokenizer load), with this project's own description under "power_retention": the
    kind, the sizes, and a SentencePiece model itself (base64), so that a directory another
    tool rewrote (mlx-lm's convert and fuse keep the key) still loads here."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ours = {"tokenizer": kind, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id}
    bos, eos = special_tokens(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "clean_up_tokenization_spaces": False, "power_retention": ours}
    if kind == "sentencepiece":
        ours["model_proto"] = base64.b64encode(tokenizer.model_proto).decode("ascii")
        config["unk_token"] = tokenizer._sp.id_to_piece(tokenizer._sp.unk_id())
        try:
            hf_json = sentencepiece_tokenizer_json(tokenizer)
        except ValueError:  # a unigram model: no tokenizer.json, only ours
            hf_json = None
    else:
        hf_json = byte_tokenizer_json(tokenizer)
    if hf_json is not None:
        (directory / HF_TOKENIZER_FILE).write_text(hf_json, encoding="utf-8")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _sentences(inputs) -> Iterator[str]:
    """Training sentences: each line with the line breaks before it, cut to fit SentencePiece.

    Line breaks go in front because SentencePiece strips them from the end of a sentence; in
    front they still teach it pieces such as a newline followed by indentation.
    """
    if isinstance(inputs, os.PathLike):
        inputs = [inputs]
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise ValueError("inputs must be an iterable of texts (str) and/or files (os.PathLike), "
                         f"got {type(inputs).__name__}; wrap a single text in a list")
    if isinstance(inputs, (list, tuple)):
        # Fail before reading gigabytes, and catch file names passed as str (read as text).
        for k, item in enumerate(inputs):
            if isinstance(item, os.PathLike) and not os.path.isfile(item):
                raise ValueError(f"inputs[{k}]: {os.fspath(item)!r} is not a file")
        first = inputs[0] if inputs else None
        if isinstance(first, str) and len(first) < 4096 and os.path.isfile(first):
            raise ValueError(f"inputs[0] is the name of a file, {first!r}, but a str is read as "
                             "text: pass files as pathlib.Path")
    for k, item in enumerate(inputs):
        if isinstance(item, str):
            yield from _line_sentences(io.StringIO(item, newline=""))
        elif isinstance(item, os.PathLike):
            if not os.path.isfile(item):
                raise ValueError(f"inputs[{k}]: {os.fspath(item)!r} is not a file")
            with open(item, encoding="utf-8", errors="replace", newline="") as lines:
                yield from _line_sentences(lines)
        else:
            raise ValueError(f"inputs[{k}] must be a str (text) or an os.PathLike (file), "
                             f"got {type(item).__name__}")


def _line_sentences(lines: Iterable[str]) -> Iterator[str]:
    breaks = ""
    for line in lines:
        content = line.rstrip("\r\n")
        if content:
            yield from _cut(breaks + content)
            breaks = ""
        breaks += line[len(content):]


def _cut(sentence: str) -> Iterator[str]:
    data = sentence.encode("utf-8", errors="replace")  # lone surrogates cannot be trained on
    start = 0
    while start < len(data):
        end = min(start + MAX_SENTENCE_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        yield data[start:end].decode("utf-8")
        start = end


def _reservoir_sample(items: Iterable[str], k: int, rng: random.Random) -> list[str]:
    """A uniform sample of k items in one pass, holding only k (Algorithm R)."""
    kept: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            kept.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                kept[j] = item
    return kept


def _training_error(error: RuntimeError, vocab_size: int, model_type: str) -> Exception:
    message = str(error)
    if found := re.search(r"required_chars\. \d+ vs (\d+)", message):
        needed = int(found[1])
        return ValueError(
            f"vocab_size={vocab_size} is too small for this text: it needs 259 pieces (256 bytes, "
            f"unk, bos, eos) plus the {needed - 259} characters that cover "
            f"{CHARACTER_COVERAGE:.2%} of it, so vocab_size >= {needed}")
    if found := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                          message):
        return ValueError(f"vocab_size={vocab_size} is more pieces than {model_type} finds in this "
                          f"text: use vocab_size <= {found[1]}, or more text")
    return error
