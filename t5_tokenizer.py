"""The T5 tokenizer: SentencePiece unigram, re-implemented from a Hugging Face `tokenizer.json`.

`T5Tokenizer` turns prompts into the (ids, mask) batches `t5.T5Encoder.encode_text` encodes (its
`from_pretrained` loads `<dir>/tokenizer.json` with it). It reads both layouts of the file: legacy
(normalizer `Precompiled`, pre-tokenizer `WhitespaceSplit` + `Metaspace` with `add_prefix_space`)
and current (normalizer `Precompiled` + `Strip` + `Replace`, pre-tokenizer `Metaspace` with
`prepend_scheme`). It follows the Hugging Face `tokenizers` library (what transformers' fast T5
tokenizer runs), not the `sentencepiece` C++ library, where the two differ: literal special-token
text such as "</s>" in a prompt becomes that special token.

What is here, in reading order
- `_Charsmap`: SentencePiece's compiled normalisation rules (the `Precompiled` normaliser).
- `_grapheme_clusters`: the part of Unicode grapheme segmentation that `Precompiled` needs.
- `_build`, `_build_normalizer`, `_build_pre_tokenizer`: the tokenizer.json steps before
  segmentation.
- `T5Tokenizer`: added/special tokens, unigram Viterbi segmentation, post-processor template,
  truncation and padding.

Known approximation: the `Precompiled` normaliser (SentencePiece's compiled `nmt_nfkc` rules) is
decoded exactly, but `tokenizers` first tries each Unicode extended grapheme cluster shorter than
6 UTF-8 bytes as a whole, and Python has no grapheme segmentation. We implement the subset of
UAX #29 that can form such short clusters (CR LF; marks, joiners and spacing marks attach to the
previous character, prepend characters to the next). With a real `nmt_nfkc` charsmap this agreed
with `tokenizers` on every code point and on 400k random 2-4 character strings of assigned
characters; characters that Python's Unicode database (14.0 on Python 3.11) does not know yet can
still differ, as can NFKC results between Python's and Rust's Unicode versions.

References (facts, not code): Kudo 2018 (unigram language-model tokenisation);
huggingface/tokenizers (unigram Viterbi, Metaspace, added tokens, Precompiled);
huggingface/spm_precompiled and google/sentencepiece (charsmap layout); huggingface/transformers
`models/t5` (the fast T5 tokenizer); Unicode UAX #29 (extended grapheme clusters).
"""
import base64
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

# Unicode White_Space (what Rust's char::is_whitespace, and so `tokenizers`, splits on). Python's
# str.split() differs: it also splits on U+001C..U+001F.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile(f"[^{_WHITESPACE}]+")
_LEADING_SPACE = re.compile(rf"\A[{_WHITESPACE}]*")
_TRAILING_SPACE = re.compile(rf"[{_WHITESPACE}]*\Z")
_K_UNK_PENALTY = 10.0  # unknown characters score (lowest piece score - 10), as in SentencePiece


################################################################################
# Normalisation: the precompiled charsmap and grapheme clusters

class _Charsmap:
    """SentencePiece's compiled normalisation rules (`precompiled_charsmap`).

    Layout: u32 trie size in bytes, a darts-clone double-array trie over UTF-8 keys (u32 units),
    then NUL-terminated replacement strings that the trie's leaf values index into.
    """

    def __init__(self, blob):
        if len(blob) < 4:
            raise ValueError("tokenizer.json: precompiled_charsmap is shorter than 4 bytes")
        size = int.from_bytes(blob[:4], "little")
        if size % 4 or size < 4 or 4 + size > len(blob):
            raise ValueError(f"tokenizer.json: precompiled_charsmap declares a {size}-byte trie in "
                             f"a {len(blob)}-byte blob")
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.replacements = blob[4 + size:]

    @staticmethod
    def _offset(unit):
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def lookup(self, key):
        """Replacement of the SHORTEST rule that is a prefix of key (what Hugging Face uses), or
        None when no rule matches."""
        units = self.units
        position = self._offset(units[0])
        for byte in key:
            if byte == 0:
                return None
            position ^= byte
            if position >= len(units) or units[position] & 0x800000FF != byte:
                return None
            unit = units[position]
            position ^= self._offset(unit)
            if unit >> 8 & 1 and position < len(units):
                start = units[position] & 0x7FFFFFFF
                end = self.replacements.find(b"\0", start)
                return self.replacements[start:end if end >= 0 else None].decode("utf-8")
        return None

    def __call__(self, text):
        out = []
        for cluster in _grapheme_clusters(text):
            encoded = cluster.encode("utf-8")
            if len(encoded) < 6 and (whole := self.lookup(encoded)) is not None:
                out.append(whole)
                continue
            for ch in cluster:
                replacement = self.lookup(ch.encode("utf-8"))
                out.append(ch if replacement is None else replacement)
        return "".join(out)


# The UAX #29 rules that can produce a cluster shorter than 6 UTF-8 bytes (all others cannot).
# Characters that join the preceding one (Extend, ZWJ, SpacingMark) besides combining marks:
_EXTEND_EXTRA = re.compile("[\u200c\u200d\u0e33\u0eb3\uff9e\uff9f\U0001f3fb-\U0001f3ff"
                           "\U000e0020-\U000e007f]")
# ... spacing marks (Mc) that UAX #29 nevertheless lets break:
_MC_BREAKS = re.compile("[\u102b\u102c\u1038\u1062-\u1064\u1067-\u106d\u1083\u1087-\u108c"
                        "\u108f\u109a-\u109c\u1a61\u1a63\u1a64\uaa7b\uaa7d\U00011720\U00011721]")
# Prepend characters join the following one.
_PREPEND = re.compile("[\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u0d4e\U000110bd\U000110cd"
                      "\U000111c2\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84-\U00011a89"
                      "\U00011d46\U00011f02]")


def _joins_previous(ch):
    category = unicodedata.category(ch)
    return (category in ("Mn", "Me") or category == "Mc" and not _MC_BREAKS.match(ch)
            or bool(_EXTEND_EXTRA.match(ch)))


def _is_control(ch):
    category = unicodedata.category(ch)
    return category in ("Cc", "Zl", "Zp") or (
        category == "Cf" and not _joins_previous(ch) and not _PREPEND.match(ch))


def _grapheme_clusters(text):
    """Approximate extended grapheme clusters (see the module docstring): CR LF stays together;
    controls stand alone; marks and joiners attach to the preceding character, prepend characters
    to the following one."""
    clusters = []
    for ch in text:
        if clusters:
            last = clusters[-1][-1]
            if (last == "\r" and ch == "\n") or (
                    not _is_control(last) and not _is_control(ch)
                    and (_joins_previous(ch) or _PREPEND.match(last))):
                clusters[-1] += ch
                continue
        clusters.append(ch)
    return clusters


################################################################################
# Normalizer and pre-tokenizer, built from their tokenizer.json entries

def _build(spec, key, build_step):
    """A tokenizer.json normalizer or pre-tokenizer entry as one function: the identity when it is
    absent, its steps (the list under `key`) applied in order for a "Sequence", otherwise
    `build_step(spec)`."""
    if spec is None:
        return lambda value: value
    if spec.get("type") == "Sequence":
        steps = [_build(s, key, build_step) for s in spec[key]]

        def sequence(value):
            for step in steps:
                value = step(value)
            return value
        return sequence
    return build_step(spec)


def _build_normalizer(spec):
    """One tokenizer.json normalizer step -> str -> str function."""
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return partial(unicodedata.normalize, kind)
    if kind == "Precompiled":
        charsmap = spec.get("precompiled_charsmap")
        return _Charsmap(base64.b64decode(charsmap)) if charsmap else (lambda s: s)
    if kind == "Strip":
        left, right = spec.get("strip_left", False), spec.get("strip_right", False)

        def strip(s):
            if left:
                s = _LEADING_SPACE.sub("", s)
            return _TRAILING_SPACE.sub("", s) if right else s
        return strip
    if kind == "Replace":
        pattern = spec["pattern"]
        regex = re.compile(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        content = spec["content"]
        return lambda s: regex.sub(lambda _: content, s)  # a function: no backslash escapes
    raise ValueError(f"tokenizer.json normalizer type {kind!r} is not supported; supported: "
                     "Sequence, NFC, NFD, NFKC, NFKD, Precompiled, Strip, Replace")


def _build_pre_tokenizer(spec):
    """One tokenizer.json pre-tokenizer step -> function on [(text, starts_the_input)] lists."""
    kind = spec.get("type")
    if kind == "WhitespaceSplit":
        return lambda words: [(m.group(), first and m.start() == 0)
                              for text, first in words for m in _WORD.finditer(text)]
    if kind == "Metaspace":
        return partial(_metaspace, spec["replacement"], _prepend_scheme(spec),
                       spec.get("split", True))
    raise ValueError(f"tokenizer.json pre_tokenizer type {kind!r} is not supported; supported: "
                     "Sequence, WhitespaceSplit, Metaspace")


def _prepend_scheme(spec):
    # Legacy files carry add_prefix_space (true = "always"); newer ones carry prepend_scheme.
    scheme = spec.get("prepend_scheme", "always")
    if spec.get("add_prefix_space") is False:
        scheme = "never"
    if scheme not in ("always", "first", "never"):
        raise ValueError(f"tokenizer.json Metaspace prepend_scheme {scheme!r}; allowed: always, "
                         "first, never")
    return scheme


def _metaspace(replacement, scheme, split, words):
    """Spaces become the meta symbol, which is prepended to (every | the first | no) word and
    starts each piece when splitting."""
    out = []
    for text, first in words:
        text = text.replace(" ", replacement)
        if (scheme == "always" or scheme == "first" and first) and not text.startswith(replacement):
            text = replacement + text
        pieces = re.split(f"(?={re.escape(replacement)})", text) if split else [text]
        out += [(p, first and i == 0) for i, p in enumerate(p for p in pieces if p)]
    return out


################################################################################
# The tokenizer

@dataclass
class _AddedToken:
    id: int
    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


class T5Tokenizer:
    """SentencePiece-unigram tokenizer from a Hugging Face `tokenizer.json`.

    Per prompt: split out added/special tokens, normalise, pre-tokenise into "▁"-prefixed words,
    Viterbi-segment each word into the highest-scoring pieces (unknown characters fused into one
    <unk>), then apply the post-processor template (T5: append </s>).
    """

    def __init__(self, spec):
        model = spec.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(f"tokenizer.json model type is {model.get('type')!r}; a T5 tokenizer "
                             "is a SentencePiece 'Unigram' model")
        if model.get("byte_fallback"):
            raise ValueError("tokenizer.json: Unigram byte_fallback is not supported (T5 does not "
                             "use it)")
        vocab = model.get("vocab") or []
        if not vocab:
            raise ValueError("tokenizer.json: the Unigram model has an empty vocabulary")
        # piece -> (id, score); a repeated piece resolves to its last entry, as in `tokenizers`
        self.pieces = {piece: (i, score) for i, (piece, score) in enumerate(vocab)}
        self.max_piece_length = max(map(len, self.pieces))
        self.unk_id = model.get("unk_id")
        self.unk_score = min(score for _, score in vocab) - _K_UNK_PENALTY

        added = [_AddedToken(**{k: t[k] for k in _AddedToken.__dataclass_fields__ if k in t})
                 for t in spec.get("added_tokens") or []]
        self.vocab_size = max([len(vocab)] + [t.id + 1 for t in added])  # ids the model must embed
        self.normalize = _build(spec.get("normalizer"), "normalizers", _build_normalizer)
        self.pre_tokenize = _build(spec.get("pre_tokenizer"), "pretokenizers", _build_pre_tokenizer)
        # Raw-text tokens are matched before normalisation, "normalized" ones in normalised text.
        self.raw_added = {t.content: t for t in added if not t.normalized}
        self.normalized_added = {self.normalize(t.content): t for t in added if t.normalized}
        self.raw_pattern = self._alternation(self.raw_added)
        self.normalized_pattern = self._alternation(self.normalized_added)
        self.prefix, self.suffix = self._template(spec.get("post_processor"))

        added_ids = {t.content: t.id for t in added}
        pad = (spec.get("padding") or {}).get("pad_token", "<pad>")
        self.pad_id = added_ids.get(pad, self.pieces.get(pad, (None,))[0])
        if self.pad_id is None:
            raise ValueError(f"tokenizer.json defines no padding token {pad!r}")

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        return cls(json.loads(path.read_text(encoding="utf-8")))

    @staticmethod
    def _alternation(tokens):
        # longest first, so the regex alternation finds the leftmost-longest match
        ordered = sorted(tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @staticmethod
    def _template(spec):
        """Special ids the post-processor puts before / after the sequence ($A)."""
        if spec is None:
            return [], []
        if spec.get("type") != "TemplateProcessing":
            raise ValueError(f"tokenizer.json post_processor type {spec.get('type')!r} is not "
                             "supported; supported: TemplateProcessing")
        prefix, suffix = [], []
        target = prefix
        for item in spec["single"]:
            if "Sequence" in item:
                target = suffix
            else:
                target += spec["special_tokens"][item["SpecialToken"]["id"]]["ids"]
        return prefix, suffix

    def _split_added(self, text, pattern, tokens, first):
        """-> [(text, added token id or None, starts_the_input)] covering text."""
        if pattern is None:
            return [(text, None, first)] if text else []
        out, position = [], 0
        for match in pattern.finditer(text):
            token = tokens[match.group()]
            start, stop = match.span()
            if token.single_word and (re.search(r"\w\Z", text[:start])
                                      or re.match(r"\w", text[stop:])):
                continue
            if token.lstrip:
                start = max(_TRAILING_SPACE.search(text[:start]).start(), position)
            if token.rstrip:
                stop += _LEADING_SPACE.match(text[stop:]).end()
            if position < start:
                out.append((text[position:start], None, first and position == 0))
            out.append((text[start:stop], token.id, False))
            position = stop
        if position < len(text):
            out.append((text[position:], None, first and position == 0))
        return out

    def _unigram(self, word):
        """Best segmentation of one pre-tokenised word into piece ids (Viterbi)."""
        n = len(word)
        score = [0.0] + [-math.inf] * n
        back = [None] * (n + 1)  # best (start, id) ending here
        for i in range(n):
            has_single_char_piece = False
            for j in range(i + 1, min(n, i + self.max_piece_length) + 1):
                entry = self.pieces.get(word[i:j])
                if entry is None:
                    continue
                candidate = score[i] + entry[1]
                # strict ">" keeps the first-found path on ties, like the reference
                if back[j] is None or candidate > score[j]:
                    score[j], back[j] = candidate, (i, entry[0])
                has_single_char_piece |= j == i + 1
            if not has_single_char_piece:
                if self.unk_id is None:
                    raise ValueError(f"character {word[i]!r} is not in the vocabulary and "
                                     "tokenizer.json defines no unk_id")
                candidate = score[i] + self.unk_score
                if back[i + 1] is None or candidate > score[i + 1]:
                    score[i + 1], back[i + 1] = candidate, (i, self.unk_id)
        segments = []
        j = n
        while j > 0:
            i, piece_id = back[j]
            segments.append((word[i:j], piece_id))
            j = i
        ids, unknown = [], ""
        for text, piece_id in reversed(segments):
            if piece_id == self.unk_id:  # consecutive unknowns become one <unk>
                unknown += text
                continue
            if unknown:
                ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
                unknown = ""
            ids.append(piece_id)
        if unknown:
            ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
        return ids

    def encode(self, text, max_length=None):
        """Token ids of one prompt, with the template's special tokens; at most max_length ids."""
        ids = []
        raw_parts = self._split_added(text, self.raw_pattern, self.raw_added, True)
        for raw, raw_id, raw_first in raw_parts:
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for part, part_id, part_first in self._split_added(
                    self.normalize(raw), self.normalized_pattern, self.normalized_added, raw_first):
                if part_id is not None:
                    ids.append(part_id)
                    continue
                for word, _ in self.pre_tokenize([(part, part_first)]):
                    ids += self._unigram(word)
        if max_length is not None:  # truncation keeps room for the template's special tokens
            reserved = len(self.prefix) + len(self.suffix)
            if not isinstance(max_length, int) or max_length <= reserved:
                raise ValueError(f"max_length must be an integer > {reserved} (the template's "
                                 f"special tokens), got {max_length!r}")
            ids = ids[:max_length - reserved]
        return self.prefix + ids + self.suffix

    def __call__(self, prompts, max_length=120, padding="max_length"):
        """Batch-encode -> (ids (B, L) int64, mask (B, L) bool), right-padded with the pad id."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}; "
                             "wrap a single prompt in a list")
        if not prompts:
            raise ValueError("prompts is empty; pass at least one string")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must all be strings; entries {bad[:5]} are not")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        sequences = [self.encode(p, max_length) for p in prompts]
        length = max_length if padding == "max_length" else max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = True
        return ids, mask
