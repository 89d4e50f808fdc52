"""CLIP tokenization exactly as transformers' `CLIPTokenizer`, built from a tokenizer folder's files.

The reference is the tokenizer the checkpoint was trained and is sampled with: transformers' slow
`CLIPTokenizer` (with ftfy installed) called as `tokenizer(prompts, padding="max_length",
truncation=True, max_length=77)`. Implemented here from its documented behaviour, on the folder's
own files, so neither transformers nor a download is needed:

1. Every added token (each token of special_tokens_map.json and tokenizer_config.json's special
   keys and `added_tokens_decoder`, plus added_tokens.json) is split out of the raw text first, by
   exact, case-sensitive match (longest first). With the laion ViT-H-14 files the pad token is
   "!", so every literal "!" becomes id 0 on its own and never merges with its neighbours.
2. Each remaining chunk is cleaned on its own: ftfy.fix_text (HTML entities, curly quotes, widths,
   mojibake, NFC), whitespace runs collapsed and stripped, lower-cased; then CLIP's regex and the
   byte-level BPE of merges.txt, looked up in vocab.json (unknown pieces -> the unk token).
3. At most context_length-2 content ids are kept, framed by the bos/eos ids, padded with the pad id.

`tests/test_parity_tokenizer.py` checks every prompt of the reference ids (../shared/conformance).
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import regex
import torch

from meissonic_cli.atomic import write_text
from meissonic_cli.errors import ModelFormatError

_CLIP_MERGES = 49152 - 256 - 2
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                 r"""[^\s\p{L}\p{N}]+""")


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters.

    Its order matters: the vocabulary starts with these characters in this order (the printable
    bytes, then the others shifted past 255), so id i of the first 256 is the i-th entry here.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


@dataclass(frozen=True)
class AddedToken:
    """A token split out of the raw text before BPE (transformers' AddedToken flags)."""

    content: str
    id: int
    lstrip: bool = False  # eats the whitespace on its left
    rstrip: bool = False  # eats the whitespace on its right
    single_word: bool = False  # only matches as a whole word


class BpeVocabulary:
    """vocab.json + merges.txt: the byte-level BPE tables, with a per-word cache."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.merges = tuple(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._cache: dict[str, str] = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    @classmethod
    def from_files(cls, vocab_path: Path, merges_path: Path) -> "BpeVocabulary":
        try:
            encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{vocab_path}: not a readable vocab.json ({err})") from None
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ModelFormatError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise ModelFormatError(f"{merges_path}: not a readable merges.txt ({err})") from None
        body = lines[1:] if lines and lines[0].startswith("#version") else lines
        merges = []
        for number, line in enumerate(body[:_CLIP_MERGES], start=2):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ModelFormatError(f"{merges_path} line {number}: expected two tokens per merge, got {line!r}")
            if parts[0] + parts[1] not in encoder:
                raise ModelFormatError(f"{merges_path} line {number}: merge {line!r} makes {parts[0] + parts[1]!r}, "
                                       f"which {vocab_path.name} lacks; the two files do not belong together")
            merges.append((parts[0], parts[1]))
        return cls(encoder, merges)

    def bpe(self, word: str) -> list[str]:
        """BPE pieces of one byte-encoded word (the last piece ends in '</w>')."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached.split(" ")
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = " ".join(parts)
        return parts


@functools.lru_cache(maxsize=1)
def _bundled_vocabulary() -> BpeVocabulary:
    """CLIP's BPE as open_clip ships it, with the Hugging Face names of the two special tokens
    (the same ids and merges as a released `tokenizer/` folder)."""
    import importlib.util

    # The file itself, found without importing open_clip (whose import pulls in timm: seconds).
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelFormatError("CLIP's BPE file (bpe_simple_vocab_16e6.txt.gz, shipped with open_clip_torch) was not "
                               "found; reinstall open_clip_torch or pass a tokenizer folder with vocab.json and merges.txt")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
    symbols = list(_byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return BpeVocabulary({tok: i for i, tok in enumerate(vocab)}, merges)  # type: ignore[arg-type]


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class ClipTokenizer:
    """CLIP tokenization to a fixed length, as transformers' CLIPTokenizer does it (see above).

    `ClipTokenizer()` uses CLIP's BPE (shipped with open_clip) in the laion ViT-H-14 layout: bos
    `<|startoftext|>`, eos/unk `<|endoftext|>`, pad `!` (id 0); `from_pretrained(folder)` reads a
    Hugging Face tokenizer folder instead. `pad_id` picks the pad token by id.
    """

    def __init__(self, context_length: int = 77, pad_id: int = 0, *, vocabulary: Optional[BpeVocabulary] = None,
                 special: Optional[dict[str, str]] = None, added: Sequence[AddedToken] = ()):
        self.context_length = int(context_length)
        self.vocab = vocabulary or _bundled_vocabulary()
        special = dict(special or {})
        if "pad_token" not in special:
            if pad_id not in self.vocab.decoder:
                raise ModelFormatError(f"pad id {pad_id} is not in the tokenizer's vocabulary")
            special["pad_token"] = self.vocab.decoder[pad_id]
        special.setdefault("bos_token", "<|startoftext|>")
        special.setdefault("eos_token", "<|endoftext|>")
        special.setdefault("unk_token", "<|endoftext|>")
        self.special = special
        tokens: dict[str, AddedToken] = {t.content: t for t in added}
        for key, text in special.items():
            if text not in tokens:
                if text not in self.vocab.encoder:
                    raise ModelFormatError(f"{key} {text!r} is not in the tokenizer's vocabulary")
                tokens[text] = AddedToken(text, self.vocab.encoder[text])
        self.added = tokens
        self.bos_id = self._id_of(special["bos_token"])
        self.eos_id = self._id_of(special["eos_token"])
        self.pad_id = self._id_of(special["pad_token"])
        self.unk_id = self._id_of(special["unk_token"])
        # Longest first: at one position the longest added token wins.
        ordered = sorted(tokens, key=len, reverse=True)
        self._split = regex.compile("(" + "|".join(regex.escape(t) for t in ordered) + ")") if ordered else None
        self._pattern = regex.compile(_CLIP_PATTERN, regex.IGNORECASE)

    def _id_of(self, text: str) -> int:
        token = self.added.get(text)
        return token.id if token is not None else self.vocab.encoder[text]

    # -- text -> pieces

    def split_added(self, text: str) -> list[tuple[str, bool]]:
        """The text cut around its added tokens, as (chunk, is_added_token) pairs, with the tokens'
        strip and single-word rules applied and empty chunks dropped."""
        if self._split is None:
            return [(text, False)] if text else []
        chunks = [c for c in self._split.split(text)]
        # regex.split with one group alternates text, token, text, ...: odd indices are tokens.
        is_token = [i % 2 == 1 for i in range(len(chunks))]
        for i, chunk in enumerate(chunks):
            if not is_token[i]:
                continue
            tok = self.added[chunk]
            if tok.rstrip and i + 1 < len(chunks):
                chunks[i + 1] = chunks[i + 1].lstrip()
            if tok.lstrip and i > 0:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if tok.single_word:
                left, right = (chunks[i - 1] if i > 0 else ""), (chunks[i + 1] if i + 1 < len(chunks) else "")
                if left and not left[-1].isspace() or right and not right[0].isspace():
                    # Inside a word: not a token here; glue it back to its neighbour text.
                    if left and not left[-1].isspace():
                        chunks[i - 1] += chunk
                    else:
                        chunks[i + 1] = chunk + chunks[i + 1]
                    chunks[i], is_token[i] = "", False
        return [(c, t) for c, t in zip(chunks, is_token) if c]

    def clean(self, text: str) -> str:
        """What the BPE sees of a text chunk: ftfy.fix_text, whitespace collapsed and stripped, lower case."""
        import ftfy

        return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()

    def tokens(self, prompt: str) -> list[str]:
        """The pieces of one prompt, without bos/eos/padding (added tokens as their text)."""
        out: list[str] = []
        byte_map = _byte_to_unicode()
        for chunk, is_added in self.split_added(prompt):
            if is_added:
                out.append(chunk)
                continue
            for word in self._pattern.findall(self.clean(chunk)):
                out.extend(self.vocab.bpe("".join(byte_map[b] for b in word.encode("utf-8"))))
        return out

    def encode(self, prompt: str) -> list[int]:
        """Content ids of one prompt (no bos/eos, no truncation)."""
        ids = []
        for piece in self.tokens(prompt):
            token = self.added.get(piece)
            ids.append(token.id if token is not None else self.vocab.encoder.get(piece, self.unk_id))
        return ids

    def __call__(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Token ids `(B, context_length)` int64: bos, content (cut to fit), eos, then the pad id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [self.bos_id] + self.encode(prompt)[: max(0, self.context_length - 2)] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids[: self.context_length], dtype=torch.long)
        return out

    # -- files

    @classmethod
    def from_pretrained(cls, folder: str | Path, context_length: int = 77) -> "ClipTokenizer":
        """Read a Hugging Face CLIP tokenizer folder: vocab.json + merges.txt (CLIP's bundled BPE when
        both are absent), the special tokens of special_tokens_map.json (which wins) and
        tokenizer_config.json, `added_tokens_decoder`, added_tokens.json and `model_max_length`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFormatError(f"tokenizer folder not found: {folder}")
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if vocab_path.is_file() != merges_path.is_file():
            have, lack = (vocab_path, merges_path) if vocab_path.is_file() else (merges_path, vocab_path)
            raise ModelFormatError(f"{folder}: has {have.name} but not {lack.name}; a CLIP tokenizer needs both")
        vocabulary = BpeVocabulary.from_files(vocab_path, merges_path) if vocab_path.is_file() else None
        encoder = (vocabulary or _bundled_vocabulary()).encoder
        config = _read_tokenizer_json(folder / "tokenizer_config.json")
        special_map = _read_tokenizer_json(folder / "special_tokens_map.json")
        special: dict[str, str] = {}
        flags: dict[str, dict[str, Any]] = {}
        for source in (config, special_map):  # special_tokens_map.json wins, as in transformers
            for key in _SPECIAL_KEYS:
                text = _token_text(source.get(key))
                if text is not None:
                    special[key] = text
                    if isinstance(source.get(key), dict):
                        flags[text] = source[key]
        extra = list(config.get("additional_special_tokens") or []) + list(special_map.get("additional_special_tokens") or [])
        added: dict[str, AddedToken] = {}

        def add(text: str, token_id: Optional[int], spec: dict[str, Any]) -> None:
            if token_id is None:
                token_id = encoder.get(text)
            if token_id is None:
                raise ModelFormatError(f"{folder}: added token {text!r} has no id (not in vocab.json)")
            added[text] = AddedToken(text, int(token_id), bool(spec.get("lstrip", False)), bool(spec.get("rstrip", False)),
                                     bool(spec.get("single_word", False)))

        decoder = config.get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            for token_id, spec in decoder.items():
                if isinstance(spec, dict) and _token_text(spec):
                    add(spec["content"], int(token_id), spec)
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            for text, token_id in _read_tokenizer_json(added_file).items():
                if text not in added:
                    add(text, int(token_id), {})
        for text in [*special.values(), *(_token_text(t) for t in extra)]:
            if text is not None and text not in added:
                add(text, None, flags.get(text, {}))
        max_len = config.get("model_max_length")
        if isinstance(max_len, int) and max_len < context_length:
            context_length = max_len
        return cls(context_length, vocabulary=vocabulary, special=special, added=list(added.values()))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a Hugging Face CLIP tokenizer folder (vocab.json, merges.txt and the two JSON settings)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                  "do_lower_case": True, "errors": "replace", **self.special}
        write_text(folder / "vocab.json", json.dumps(self.vocab.encoder, ensure_ascii=False))
        write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in self.vocab.merges) + "\n")
        write_text(folder / "special_tokens_map.json", json.dumps(self.special, indent=2))
        write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))


def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: not a valid tokenizer JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


__all__ = ["AddedToken", "BpeVocabulary", "ClipTokenizer"]
