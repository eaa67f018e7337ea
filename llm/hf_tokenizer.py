"""Our tokenizers in Hugging Face's format (tokenizer.json), so that mlx-lm and transformers'
``AutoTokenizer`` load a saved model's tokenizer and produce the ids ours produce.

- The byte tokenizer is a byte-level BPE without merges: each byte of the UTF-8 text is one
  token, whose id is the byte (GPT-2's byte-to-character table names the 256 tokens).
- A SentencePiece BPE model (trained by ``train_tokenizer``: byte fallback, no normalization,
  no dummy prefix) becomes a BPE over its pieces, with the merges read off the vocabulary in
  the order of the pieces' scores, and byte fallback; the decoder turns byte pieces back into
  their bytes. Spaces are U+FDD0 in the converted pieces, not "▁" (see SPACE_STAND_IN): the
  one text the two tokenizers encode differently is one holding that noncharacter. Unigram
  models are not converted.

Nothing here needs ``tokenizers`` or ``transformers``: the files are plain JSON.
"""

from __future__ import annotations

import json

SPACE_SYMBOL = "\u2581"
# What a space is in the converted vocabulary instead of SentencePiece's "▁": a Unicode
# noncharacter (reserved for internal use, never in interchange text), so that a literal "▁"
# in the text stays a character of its own, encoded as its three byte pieces, as ours does.
SPACE_STAND_IN = "\ufdd0"


def byte_level_alphabet() -> list[str]:
    """The character that names each byte in byte-level BPE: printable Latin-1 bytes name
    themselves, the others are shifted past 255 (so that no name is a control character or
    a space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    names, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            names[byte] = chr(byte)
        else:
            names[byte] = chr(256 + shifted)
            shifted += 1
    return [names[byte] for byte in range(256)]


def _added_token(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _with_bos(bos: str, bos_id: int) -> dict:
    """A post-processor that puts bos in front, as ``encode(text, add_bos=True)`` does."""
    sequence = lambda name: {"Sequence": {"id": name, "type_id": 0}}  # noqa: E731
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [special, sequence("A")],
            "pair": [special, sequence("A"), special, sequence("B")],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _tokenizer_json(model: dict, added: list, normalizer, pre_tokenizer, decoder, post) -> str:
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                       "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
                       "post_processor": post, "decoder": decoder, "model": model},
                      ensure_ascii=False, indent=1)


def byte_tokenizer_json(tokenizer) -> str:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    vocab = {name: byte for byte, name in enumerate(byte_level_alphabet())}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": False, "vocab": vocab, "merges": []}
    bos, eos = special_tokens(tokenizer)
    added = sorted([_added_token(tokenizer.bos_id, bos), _added_token(tokenizer.eos_id, eos)],
                   key=lambda token: token["id"])
    # The decoder inside a Sequence: mlx-lm streams a bare ByteLevel decoder with its own
    # detokenizer, which drops a space at the start of the generated text.
    decoder = {"type": "Sequence", "decoders": [byte_level]}
    return _tokenizer_json(model, added, None, byte_level, decoder, _with_bos(bos, tokenizer.bos_id))


def sentencepiece_tokenizer_json(tokenizer) -> str:
    sp = tokenizer._sp
    model_type = sentencepiece_model_type(tokenizer.model_proto)
    if model_type != "bpe":
        raise ValueError(f"only SentencePiece BPE models convert to tokenizer.json, this one is "
                         f"{model_type}")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    pieces = [piece if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
              else piece.replace(SPACE_SYMBOL, SPACE_STAND_IN) for i, piece in enumerate(pieces)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    learned = [i for i in range(len(pieces))
               if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    # Every way to make a learned piece from two others is a merge, ranked by the piece made
    # (SentencePiece's BPE scores its pieces in the order it learned them, highest first).
    merges = []
    for i in sorted(learned, key=lambda i: -sp.get_score(i)):
        piece = pieces[i]
        merges += [[piece[:cut], piece[cut:]] for cut in range(1, len(piece))
                   if piece[:cut] in vocab and piece[cut:] in vocab]
    model = {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()],
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
             "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges}
    added = [_added_token(i, pieces[i]) for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_STAND_IN}
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE_STAND_IN}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    bos = pieces[tokenizer.bos_id]
    return _tokenizer_json(model, added, normalizer, None, decoder, _with_bos(bos, tokenizer.bos_id))


def special_tokens(tokenizer) -> tuple[str, str]:
    """The names of bos and eos in Hugging Face's files."""
    if hasattr(tokenizer, "_sp"):
        return tokenizer._sp.id_to_piece(tokenizer.bos_id), tokenizer._sp.id_to_piece(tokenizer.eos_id)
    return "<|begin_of_text|>", "<|end_of_text|>"


def _fields(message: bytes):
    """(field number, wire type, value) of a serialized protobuf message (varints as ints,
    length-delimited fields as bytes; fixed-width fields as bytes)."""
    def varint(at):
        value = shift = 0
        while True:
            byte = message[at]
            value |= (byte & 0x7F) << shift
            at, shift = at + 1, shift + 7
            if byte < 0x80:
                return value, at
    at = 0
    while at < len(message):
        key, at = varint(at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(at)
        elif wire == 2:
            length, at = varint(at)
            value, at = message[at:at + length], at + length
        else:
            width = {1: 8, 5: 4}[wire]
            value, at = message[at:at + width], at + width
        yield number, wire, value


def sentencepiece_model_type(model_proto: bytes) -> str:
    """"unigram", "bpe", "word" or "char": ModelProto.trainer_spec (field 2).model_type (field 3)."""
    for number, _, spec in _fields(model_proto):
        if number == 2:
            for field, _, value in _fields(spec):
                if field == 3:
                    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(value, str(value))
            return "unigram"  # the protobuf default
    return "unigram"
