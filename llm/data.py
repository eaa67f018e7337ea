"""Training data: read a corpus, tokenize it once into a cache, serve packed batches.

    documents = read_documents("stdlib")      # or a file, directory, glob, .jsonl, synthetic:NAME
    key = cache_key("stdlib", tokenizer, 0.05, 0, documents_fingerprint(documents))
    data = tokenize_corpus(documents, tokenizer, Path("cache/tokens"), key)
    sampler = BatchSampler(data.train_tokens, data.train_mask, seq_len=256, batch_size=8, seed=0)
    inputs, targets, mask = sampler.next_batch()      # int32, int32, float32, each (8, 256)

The train/validation split is by document, so no validation text is ever trained on. Each
document is ``[bos] + tokens + [eos]`` and the documents are packed back to back into one
stream per split; training sequences are windows of that stream (across document
boundaries, as nanoGPT does: no padding, no tokens wasted). The token streams live in flat
binary files that are memory-mapped, so a corpus larger than memory is fine and a second run
starts without tokenizing again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import numbers
import os
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from power_retention.validation import check_integer, is_integer

from .atomic import atomic_file

DEFAULT_DATA = "stdlib"
SYNTHETIC_PREFIX = "synthetic:"
META_FILE = "meta.json"
# Bump when the cache layout or the tokenization rules change, so old caches are not reused.
CACHE_FORMAT = 1
# Directories of installed packages that can sit under the standard library's directory.
# Not the standard library's own modules: third-party packages, and the test suites, which
# are 60% of the bytes (31.5 MB with them, 12.1 MB without on CPython 3.11), mostly
# repetitive assertions and deliberately malformed files.
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_GLOB_CHARS = set("*?[")


@dataclass
class Document:
    text: str  # the full text (prompt + completion for prompt/completion data)
    prompt_chars: int = 0  # the loss counts only the characters after this many


# ----------------------------------------------------------------------------- reading


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard library source: every ``*.py`` file, sorted.

    Always there, no download, and a real mix of code, docstrings and comments: a corpus that
    any machine with Python can train on.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _files_under(root, "*.py", skip_dirs=_SKIPPED_STDLIB_DIRS) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no Python source files under {root}, the standard library of this interpreter "
            "(some installs ship it compiled only): use a file, directory or glob as the data")
    return files


def read_documents(spec: str) -> list[Document]:
    """The documents that ``spec`` names.

    spec: "stdlib" (the default corpus, one document per source file); a file (one document,
        or one per line for .jsonl); a directory (every regular file under it, recursively,
        skipping hidden files and directories and binary files, i.e. ones containing NUL
        bytes); a glob pattern such as "data/*.txt" or "data/**/*.md"; or "synthetic:NAME"
        (see synthetic_documents).

    A .jsonl file has one JSON object per line, with a "text" field, or "prompt" and
    "completion" fields (the loss then counts only the completion). Blank lines are skipped,
    as are documents with no text but whitespace.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data must be a non-empty str (\"{DEFAULT_DATA}\", a file, a directory, "
                         f"a glob pattern or {SYNTHETIC_PREFIX}NAME), got {spec!r}")
    if spec.startswith(SYNTHETIC_PREFIX):
        return synthetic_documents(spec[len(SYNTHETIC_PREFIX):])

    if spec == DEFAULT_DATA:
        # A handful of the standard library's files are deliberately in other encodings
        # (tests of encoding declarations): they are left out rather than failing the default.
        documents = [doc for path in default_corpus_files()
                     for doc in _read_file(path, skip_non_utf8=True) or []]
        return _nonempty(documents, f"data {spec!r} (the standard library source)")

    path = Path(spec)
    if path.is_dir():
        files = _files_under(path, "*")
        where = f"directory {spec!r}"
    elif path.exists():
        if not path.is_file():
            raise ValueError(f"data {spec!r} is not a regular file or a directory")
        documents = _read_file(path)
        if documents is None:
            raise ValueError(f"{spec}: a binary file (it contains NUL bytes), expected UTF-8 text")
        return _nonempty(documents, spec)
    elif _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"data {spec!r}: the glob pattern matches no files")
        where = f"glob pattern {spec!r}"
    else:
        raise FileNotFoundError(
            f"data {spec!r}: no such file or directory (expected \"{DEFAULT_DATA}\", a file, a "
            f"directory, a glob pattern or {SYNTHETIC_PREFIX}NAME with NAME one of "
            f"{', '.join(SYNTHETIC_NAMES)})")
    if not files:
        raise ValueError(f"data {spec!r}: the directory has no files (hidden ones are skipped)")
    per_file = [_read_file(file) for file in files]
    binary = sum(docs is None for docs in per_file)
    documents = [doc for docs in per_file for doc in docs or []]
    skipped = f", {binary} skipped as binary (they contain NUL bytes)" if binary else ""
    return _nonempty(documents, f"{where} ({len(files)} files{skipped})")


def _files_under(root: Path, pattern: str, skip_dirs=frozenset()) -> list[Path]:
    """Regular files under root whose names match pattern, sorted, hidden ones left out."""
    found = []
    for directory, dirs, names in os.walk(root):
        # Pruning in place stops os.walk from descending (.git, site-packages).
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_dirs]
        for name in names:
            path = Path(directory) / name
            if not name.startswith(".") and path.match(pattern) and path.is_file():
                found.append(path)
    return sorted(found)


def _read_file(path: Path, skip_non_utf8: bool = False) -> list[Document] | None:
    """The documents in one file; None for a binary file (one with NUL bytes)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the file ({error.strerror or error})") from None
    if b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if skip_non_utf8:
            return None
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {error.start}); "
                         "convert it to UTF-8 or leave it out") from None
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, text)
    return [Document(text)]


def _jsonl_documents(path: Path, text: str) -> list[Document]:
    documents = []
    # Split on "\n" only: str.splitlines would also split at characters such as U+2028,
    # which JSON allows unescaped inside strings.
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column "
                             f"{error.colno})") from None
        fields = record if isinstance(record, dict) else {}
        prompt, completion = fields.get("prompt"), fields.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            document = Document(prompt + completion, prompt_chars=len(prompt))
        elif isinstance(fields.get("text"), str):
            document = Document(fields["text"])
        else:
            got = f"keys {sorted(fields)}" if fields else f"a JSON {type(record).__name__}"
            raise ValueError(f"{path}, line {number}: expected an object with a \"text\" string "
                             f"or \"prompt\" and \"completion\" strings, got {got}")
        try:
            document.text.encode("utf-8")
        except UnicodeEncodeError:
            # JSON can spell a lone surrogate ("\ud800"), which no tokenizer can encode.
            raise ValueError(f"{path}, line {number}: the text has an unpaired surrogate "
                             "escape, which is not valid Unicode") from None
        documents.append(document)
    return documents


def _nonempty(documents: list[Document], where: str) -> list[Document]:
    documents = [doc for doc in documents if doc.text.strip()]
    if not documents:
        raise ValueError(f"{where}: no text (empty, or only whitespace)")
    return documents


# ----------------------------------------------------------------------------- synthetic tasks
# Small tasks with a known answer, to check that a model learns at all (and, for mqar, that
# its recurrent state can recall): the answer is the completion, so the loss counts only it.

_KEYS = [letter + digit for letter in string.ascii_lowercase for digit in string.digits]


def _mqar_document(rng: np.random.Generator) -> Document:
    """Multi-query associative recall: "k3:v1 a7:q2 ...", then "? a7 k3", answer "q2 v1"."""
    n_pairs = int(rng.integers(4, 9))
    keys = [_KEYS[i] for i in rng.choice(len(_KEYS), n_pairs, replace=False)]
    values = [_KEYS[i] for i in rng.integers(0, len(_KEYS), n_pairs)]
    queries = rng.permutation(n_pairs)[:int(rng.integers(2, n_pairs + 1))]
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    prompt = f"{pairs}\n? {' '.join(keys[q] for q in queries)}\n"
    return Document(prompt + " ".join(values[q] for q in queries), prompt_chars=len(prompt))


def _copy_document(rng: np.random.Generator) -> Document:
    """A random string, "|", the same string again (the completion)."""
    letters = rng.choice(list(string.ascii_lowercase), int(rng.integers(8, 41)))
    text = "".join(letters)
    return Document(f"{text}|{text}", prompt_chars=len(text) + 1)


_SYNTHETIC = {"mqar": _mqar_document, "copy": _copy_document}
SYNTHETIC_NAMES = tuple(_SYNTHETIC)


def synthetic_documents(name: str, n_documents: int = 4000, seed: int = 0) -> list[Document]:
    """``n_documents`` short prompt/completion documents of the task ``name``, the same for the
    same seed: "mqar" (multi-query associative recall) or "copy"."""
    if name not in _SYNTHETIC:
        raise ValueError(f"unknown synthetic data {name!r}: expected one of "
                         f"{', '.join(SYNTHETIC_PREFIX + n for n in SYNTHETIC_NAMES)}")
    check_integer("n_documents", n_documents)
    check_integer("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    return [_SYNTHETIC[name](rng) for _ in range(n_documents)]


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedData:
    train_tokens: np.ndarray  # 1-D uint16 (vocab <= 65536) or uint32, memory-mapped
    train_mask: np.ndarray | None  # 1-D uint8, 1 where the token counts in the loss
    val_tokens: np.ndarray
    val_mask: np.ndarray | None
    n_train_documents: int
    n_val_documents: int
    cache_dir: Path


def documents_fingerprint(documents) -> str:
    """sha256 of the documents' texts and prompt boundaries, in order."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.text.encode("utf-8")
        # Lengths first, so that no two different lists of documents hash the same bytes.
        digest.update(f"{len(data)}:{doc.prompt_chars}:".encode())
        digest.update(data)
    return digest.hexdigest()


def cache_key(spec: str, tokenizer, val_fraction: float, seed: int,
              documents_fingerprint: str) -> str:
    """The cache directory name of a tokenized corpus: 16 hex digits of a sha256 over
    everything that changes the tokens (data, tokenizer, split settings, cache format)."""
    identity = {"format": CACHE_FORMAT, "spec": str(spec),
                "tokenizer": _tokenizer_identity(tokenizer), "val_fraction": float(val_fraction),
                "seed": int(seed), "documents": documents_fingerprint}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_identity(tokenizer) -> str:
    model_proto = getattr(tokenizer, "model_proto", None)
    if isinstance(model_proto, bytes):
        return "sentencepiece:" + hashlib.sha256(model_proto).hexdigest()
    if type(tokenizer).__name__ == "ByteTokenizer":
        return "byte"
    raise ValueError("tokenizer must be a ByteTokenizer or a SentencePieceTokenizer, got "
                     f"{type(tokenizer).__name__}")


def tokenize_corpus(documents, tokenizer, cache_root: Path, key: str, val_fraction: float = 0.05,
                    seed: int = 0, val_documents=None) -> TokenizedData:
    """Split ``documents`` into train and validation, tokenize both into
    ``cache_root/key/``, and return memory-mapped views of the token streams.

    The split is by document, a seeded permutation: ``round(n * val_fraction)`` documents (at
    least 1, at most n - 1) for validation. A single document is cut in two at the line
    boundary nearest to ``1 - val_fraction`` of its text; ``val_documents``, when given, are the
    validation set instead (and leave the training set). The cache is written atomically
    (meta.json last), and reused when its meta.json matches, so a corpus is tokenized once.

    The loss mask is 0 for bos and for prompt tokens, 1 for the rest. bos is masked because
    it always follows eos, so predicting it is free and would flatter the loss. Hence the
    masks are always stored (None is left for streams made elsewhere).
    """
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: there is nothing to tokenize")
    if val_documents is not None and not list(val_documents):
        raise ValueError("val_documents is empty: there is nothing to validate on")
    for k, doc in enumerate(documents + list(val_documents or [])):
        if not isinstance(doc, Document):
            raise ValueError(f"documents[{k}] must be a Document, got {type(doc).__name__}")
        if not is_integer(doc.prompt_chars) or not 0 <= doc.prompt_chars <= len(doc.text):
            raise ValueError(f"documents[{k}].prompt_chars must be in [0, len(text)] = "
                             f"[0, {len(doc.text)}], got {doc.prompt_chars!r}")
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    check_integer("seed", seed, minimum=0)
    if not isinstance(key, str) or not key or {"/", os.sep} & set(key) or key.startswith("."):
        raise ValueError(f"key must be a directory name (see cache_key), got {key!r}")

    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    cache_dir = Path(cache_root) / key
    settings = {"format": CACHE_FORMAT, "key": key, "dtype": np.dtype(dtype).name,
                "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "val_fraction": float(val_fraction), "seed": seed,
                "n_documents": len(documents),
                "n_given_val_documents": len(val_documents) if val_documents is not None else None}
    cached = _load_cache(cache_dir, settings)
    if cached is not None:
        return cached

    train_docs, val_docs = split_documents(documents, val_fraction, seed, val_documents)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # From here until the new meta.json is in place the directory is not a valid cache.
    (cache_dir / META_FILE).unlink(missing_ok=True)
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        with atomic_file(cache_dir / f"{split}.bin") as tokens_file, \
                atomic_file(cache_dir / f"{split}.mask.bin") as mask_file:
            n_tokens = 0
            for doc in docs:
                ids, mask = _encode_document(doc, tokenizer, dtype)
                tokens_file.write(ids.tobytes())
                mask_file.write(mask.tobytes())
                n_tokens += len(ids)
        counts[split] = n_tokens
    meta = dict(settings, train_tokens=counts["train"], val_tokens=counts["val"],
                n_train_documents=len(train_docs), n_val_documents=len(val_docs))
    with atomic_file(cache_dir / META_FILE) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode())
    data = _load_cache(cache_dir, settings)
    assert data is not None, f"{cache_dir}: the cache just written does not read back"
    return data


def split_documents(documents: list[Document], val_fraction: float, seed: int,
                    val_documents: list[Document] | None = None) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents, each in a seeded random order (see tokenize_corpus).

    Exact duplicates are dropped first (repeated jsonl rows, copied files): otherwise a
    validation document could also be a training document. Given ``val_documents``, they are
    the validation set, and the training set is every other document."""
    def unique(docs):
        kept = {}
        for doc in docs:
            kept.setdefault((doc.text, doc.prompt_chars), doc)
        return list(kept.values())

    documents = unique(documents)
    if val_documents is not None:
        val_documents = unique(val_documents)
        held_out = {(doc.text, doc.prompt_chars) for doc in val_documents}
        train = [doc for doc in documents if (doc.text, doc.prompt_chars) not in held_out]
        if not train:
            raise ValueError("every training document is also a validation document: nothing "
                             "is left to train on")
        order = np.random.default_rng(seed).permutation(len(train))
        return [train[i] for i in order], val_documents
    n = len(documents)
    if n == 1:
        return _split_one(documents[0], val_fraction)
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    # Shuffled, not in corpus order: neither split takes one region of the corpus (one
    # package's files), and training windows do not keep neighbouring files together.
    return [documents[i] for i in order[n_val:]], [documents[i] for i in order[:n_val]]


def _split_one(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    if len(text) < 2:
        raise ValueError(f"the corpus is one document of {len(text)} character(s): too short to "
                         "split into training and validation text")
    target = round(len(text) * (1 - val_fraction))
    # Cut just after a newline, the one nearest the target if it is within 10% of the text
    # from it (a far one could leave almost nothing on one side); otherwise at the target.
    before, after = text.rfind("\n", 0, target) + 1, text.find("\n", target) + 1
    tolerance = max(len(text) // 10, 1)
    cuts = [c for c in (before, after) if 0 < c < len(text) and abs(c - target) <= tolerance]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else target
    cut = min(max(cut, 1), len(text) - 1)
    train = Document(text[:cut], min(doc.prompt_chars, cut))
    val = Document(text[cut:], max(doc.prompt_chars - cut, 0))
    return [train], [val]


def _encode_document(doc: Document, tokenizer, dtype) -> tuple[np.ndarray, np.ndarray]:
    # Prompt and completion are encoded apart, so no token straddles the boundary.
    prompt = tokenizer.encode(doc.text[:doc.prompt_chars]) if doc.prompt_chars else []
    rest = tokenizer.encode(doc.text[doc.prompt_chars:])
    ids = np.array([tokenizer.bos_id, *prompt, *rest, tokenizer.eos_id], dtype=dtype)
    mask = np.ones(len(ids), dtype=np.uint8)
    mask[:1 + len(prompt)] = 0
    return ids, mask


def _load_cache(cache_dir: Path, settings: dict) -> TokenizedData | None:
    """The cached data if meta.json is there, matches ``settings`` and its files are whole."""
    try:
        meta = json.loads((cache_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing (never finished) or damaged: rebuild
        return None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in settings.items()):
        return None
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        n = meta.get(f"{split}_tokens")
        files = {"tokens": (cache_dir / f"{split}.bin", dtype),
                 "mask": (cache_dir / f"{split}.mask.bin", np.dtype(np.uint8))}
        for name, (path, file_dtype) in files.items():
            if not is_integer(n) or n < 2 or not path.is_file() \
                    or path.stat().st_size != n * file_dtype.itemsize:
                return None
            arrays[f"{split}_{name}"] = np.memmap(path, dtype=file_dtype, mode="r", shape=(n,))
    return TokenizedData(arrays["train_tokens"], arrays["train_mask"], arrays["val_tokens"],
                         arrays["val_mask"], meta["n_train_documents"], meta["n_val_documents"],
                         cache_dir)


# ----------------------------------------------------------------------------- batches


def _windows(tokens, mask, starts, length: int):
    """(inputs int32, targets int32, mask float32) of the windows tokens[s:s + length + 1]."""
    windows = np.stack([np.asarray(tokens[s:s + length + 1]) for s in starts]).astype(np.int32)
    if mask is None:
        weights = np.ones((len(starts), length), dtype=np.float32)
    else:
        # A window's loss is on its targets, so the mask is shifted with them.
        weights = np.stack([np.asarray(mask[s + 1:s + length + 1]) for s in starts])
        weights = weights.astype(np.float32)
    return windows[:, :-1], windows[:, 1:], weights


def _check_stream(tokens, mask, name: str):
    if getattr(tokens, "ndim", None) != 1:
        raise ValueError(f"{name} tokens must be a 1-D array, got {type(tokens).__name__} with "
                         f"shape {getattr(tokens, 'shape', None)}")
    if mask is not None and getattr(mask, "shape", None) != tokens.shape:
        raise ValueError(f"{name} mask must be None or a 1-D array as long as the tokens "
                         f"({len(tokens)}), got shape {getattr(mask, 'shape', None)}")


class BatchSampler:
    """Fixed-length training sequences from a token stream, in a seeded random order.

    Sequence i is the window tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are all but
    its last token, targets all but its first. Each epoch visits every window once, in the
    order np.random.default_rng((seed, epoch)).permutation, so the order at any step can be
    recomputed from (epoch, index) alone: that is all a checkpoint has to hold.
    """

    def __init__(self, tokens, mask, seq_len: int, batch_size: int, seed: int):
        _check_stream(tokens, mask, "training")
        check_integer("seq_len", seq_len)
        check_integer("batch_size", batch_size)
        check_integer("seed", seed, minimum=0)
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the training split has {len(tokens)} tokens, but one sequence of "
                             f"seq_len={seq_len} needs {seq_len + 1}: use a smaller --seq-len "
                             f"(at most {max(len(tokens) - 1, 1)}) or more data")
        self.tokens, self.mask = tokens, mask
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.epoch, self.index = 0, 0  # the next window is order(epoch)[index]
        self._order_epoch, self._order = None, None

    @property
    def windows_per_epoch(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order, self._order_epoch = rng.permutation(self.windows_per_epoch), self.epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs int32 (B, T), targets int32 (B, T), loss mask float32 (B, T))."""
        starts = []
        for _ in range(self.batch_size):
            starts.append(int(self._epoch_order()[self.index]) * self.seq_len)
            self.index += 1
            if self.index == self.windows_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
        return _windows(self.tokens, self.mask, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved ``state`` stopped."""
        # A different seed, seq_len or stream would make (epoch, index) point at other data.
        # batch_size may differ: the windows still come in the same order.
        for name in ("seed", "seq_len", "windows_per_epoch"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"the saved sampler state has {name}={state[name]!r} but this "
                                 f"sampler has {name}={getattr(self, name)!r}: it was saved for "
                                 "other data or settings")
        epoch, index = state.get("epoch"), state.get("index")
        if not is_integer(epoch) or epoch < 0 or not is_integer(index) \
                or not 0 <= index < self.windows_per_epoch:
            raise ValueError(f"the saved sampler state needs epoch >= 0 and index in [0, "
                             f"{self.windows_per_epoch}), got epoch={epoch!r}, index={index!r}")
        self.epoch, self.index = epoch, index


def validation_batches(tokens, mask, seq_len: int, batch_size: int,
                       max_batches: int) -> list[tuple]:
    """Up to ``max_batches`` batches of windows spread evenly over the whole validation
    stream, the same at every evaluation.

    Evenly spaced, not consecutive from the start: the validation documents differ (a corpus
    of source files has licence headers, tests, tables of data), and windows from the first
    few of them alone are not a fair sample of the rest. When the
    stream holds no more windows than asked for, every window is taken. The last batch may
    have fewer than ``batch_size`` windows. A stream shorter than one window gives a single
    window of all of it (inputs of length len(tokens) - 1).
    """
    _check_stream(tokens, mask, "validation")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_batches", max_batches)):
        check_integer(name, value)
    if len(tokens) < 2:
        raise ValueError(f"the validation split is empty: it has {len(tokens)} token(s) and "
                         "needs at least 2 (one input and its target)")
    if len(tokens) < seq_len + 1:
        return [_windows(tokens, mask, [0], len(tokens) - 1)]
    available = (len(tokens) - 1) // seq_len
    n_windows = min(available, max_batches * batch_size)
    if n_windows == available or n_windows == 1:
        starts = [i * seq_len for i in range(n_windows)]
    else:  # first window at the start, last at the end; at least seq_len apart
        last_start = len(tokens) - 1 - seq_len
        starts = [round(i * last_start / (n_windows - 1)) for i in range(n_windows)]
    return [_windows(tokens, mask, starts[i:i + batch_size], seq_len)
            for i in range(0, n_windows, batch_size)]


def unigram_entropy(tokens, vocab_size) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of a model that ignores context,
    so a model that has learned anything must get below it."""
    check_integer("vocab_size", vocab_size)
    if len(tokens) == 0:
        raise ValueError("tokens is empty: the entropy of no tokens is undefined")
    counts = np.zeros(vocab_size, dtype=np.int64)
    # In chunks: bincount converts to int64, which would be 4x a uint16 corpus at once.
    step = 1 << 22
    for start in range(0, len(tokens), step):
        chunk = np.asarray(tokens[start:start + step])
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            raise ValueError(f"tokens must be in [0, vocab_size={vocab_size}), got "
                             f"{chunk.min() if chunk.min() < 0 else chunk.max()}")
        counts += np.bincount(chunk, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

