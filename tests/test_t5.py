"""Tests for checkpoint.py's safetensors reader, t5.py and t5_tokenizer.py: T5 encoder parity with
`transformers`, tokenizer parity with `tokenizers` (both tokenizer.json layouts), and clear errors
on bad input. CPU, random weights."""

import base64
import json
import random
import string

import pytest
import torch

import t5
import t5_tokenizer
from checkpoint import load_safetensors, load_safetensors_metadata

# A SentencePiece `precompiled_charsmap` (the binary normaliser T5's tokenizer.json embeds),
# produced by sentencepiece 0.2.3 from a 135-rule TSV: NFKC of fullwidth letters and digits,
# ligatures, circled and roman numerals, units and fractions; tab / newline / NBSP / ZWSP / BOM ->
# space; some control characters removed; composed accents (e + U+0301 -> é, ...); and one
# two-character key (ﬁ + U+0301) whose prefix is also a key. Its content need not be trusted: the
# tests compare our decoding of it with the `tokenizers` library's.
SMALL_CHARSMAP = base64.b64decode(
    "AAgAAAAMAAAAAACAAQ0AAMxIAgAHFQAAAQAAgHsAAIB+AACAgQAAgAoxAAAJPQAAhAAAgIcAAIDMZAIADS0AAIoAAICB"
    "XQAAgF0AAINlAACCbQAAgG0AAIE9AACCNQAAgykAABtlAACIVQAAjQAAgJAAAICICQAAKQEAgJMAAIAgAQCAzBACAJYA"
    "AICZAACAnAAAgIAVAACBHQAAghUAAIM9AAALAQCAnwAAgMx4AgCiAACAiBUAAKUAAICoAACAqwAAgK4AAIDMLAIAiM0B"
    "AKexAACAfQAAgWEAAIJhAACDYQAAgh0AAIPlAQCAHQAAgRUAAIgxAACxAACAtAAAgLcAAIAXAQCAugAAgEE0AgDMTAIA"
    "vQAAgMAAAIBFHAIAwwAAgMYAAIDJAACASZgCAMwcAgBPqAIAgQkAAIJpAAAFAQCAgFEAAIFRAACCVQAAg20AAAgBAIDM"
    "AACAVawCAMy8AgCIRQAAzwAAgNIAAIDVAACALQEAgNgAAIAjAQCApwUAAGOcAwDMjAEAYbQDANsAAIDeAACA4QAAgGX0"
    "AwAOAQCA5AAAgMy0AQBpHAMAp/kAAG9MAwBuIAMAHQEAgBEBAICItQAA5wAAgBQBAIDM9AEA6gAAgO0AAIB1FAMA8AAA"
    "gICFAACBjQAAgoUAAIOdAAB/9QEA8wAAgPYAAIDMvAEAgpUDAIOZAwCAhQMAgZ0DAICpAwCBqQMAiOEDAIPZAwD5AACA"
    "/AAAgIiJAwD/AACAgu0DAIPBAwCA6QMAgekDAIBhAACBYQAAgmUAAIMZAACmKQAAGgEAgAIBAIAbAACAiDkAAB0AAIAD"
    "AACAou0AABUAAIAPAACABwAAgKb5AABTAACAJgEAgJEQAwCnRQMArZUCAICBAgA7AACADQAAgB8AAICgsQIAoDEAACEA"
    "AICdDQAAgVUAAHgAAIBoAACAawAAgIPRAgCODAIAgAQCAL2lAAC8pQAAhfACAIQ4AgB0AACAi/ECALONAACysQAAgGQC"
    "ALSdAACPQQAAsgAAAKwoAgDCIAMApKUBAHEAAICidQEAo7UBAKCFAQChQQEAgi0AAL8xAwCA6QEAgQEEAMEAAAALAACA"
    "IwAAgMIAAAC8IAUAvQAFAL7AAgAlAACAJwAAgCkAAIArAACAu4QCAC0AAIAvAACAMQAAgDMAAIA1AACANwAAgDkAAIA9"
    "AACA43ADAOJIAwA/AACAQQAAgEMAAIBFAACA6wAAAEcAAIBJAACASwAAgE0AAIBPAACA7wACAFEAAIBWAACAWAAAgFoA"
    "AIBcAACAXgAAgGAAAIBiAACAZAAAgGYAAIA5AQCA9QAAAD0BAIAxAQCANQEAgJ4ZAACfGQAA8wAAAPIAAACYUQcAmVEH"
    "AAIAAAADAAAABAAAAAUAAAAGAAAAzKwEAJAVBwCRuQYAknUGAJNJBgCUkQYAlZkGAJYBBwCXcQcAgZEHABEAAACDkQcA"
    "gpkHABQAAAAVAAAAFgAAABcAAAAYAAAAGQAAABoAAAAbAAAAHAAAAB0AAAAeAAAAHwAAALhFBwC5TQcAukUHACMAAAAk"
    "AAAAJQAAALd9BwC2QQcAsAEHALEBBwCyAQcAswEHALQFBwC1DQcAtgUHALd9BwCouQcAqV0GAKq1BwCrRQcArF0HAK1F"
    "BwCuTQcAr0EHADgAAAChvQcAookHAKOJBwCkmQcApZkHAKaJBwCniQcAQAAAAEEAAABCAAAAQwAAAEQAAABFAAAARgAA"
    "AEcAAABIAAAASQAAAEoAAABLAAAATAAAAE0AAABOAAAATwAAAFAAAABRAAAAUgAAAFMAAABUAAAAVQAAAFYAAABXAAAA"
    "WAAAAFkAAABaAAAAWwAAAFwAAABdAAAAXgAAAF8AAABgAAAAYQAAAGIAAABjAAAAZAAAAGUAAABmAAAAZwAAAGgAAABp"
    "AAAAagAAAGsAAABsAAAAbQAAAG4AAABvAAAAcAAAAHEAAAByAAAAcwAAAHQAAAB1AAAAdgAAAHcAAAB4AAAAeQAAAHoA"
    "AAB7AAAAfAAAAH0AAAB+AAAAfwAAAIAAAACBAAAAggAAAIMAAACEAAAAhQAAAIYAAACHAAAAiAAAAIkAAACKAAAAiwAA"
    "AIwAAACNAAAAjgAAAI8AAACQAAAAkQAAAJIAAACTAAAAlAAAAJUAAACWAAAAlwAAAJgAAACZAAAAmgAAAJsAAACcAAAA"
    "nQAAAJ4AAACfAAAAoAAAAKEAAACiAAAAowAAAKQAAAClAAAApgAAAKcAAACoAAAAqQAAAKoAAACrAAAArAAAAK0AAACu"
    "AAAArwAAALAAAACxAAAAsgAAALMAAAC0AAAAtQAAALYAAAC3AAAAuAAAALkAAAC6AAAAuwAAALwAAAC9AAAAvgAAAL8A"
    "AADAAAAAwQAAAMIAAADDAAAAxAAAAMUAAADGAAAAxwAAAMgAAADJAAAAygAAAG4AAIDMAAAAzQAAAM4AAADPAAAA0AAA"
    "ANEAAADSAAAA0wAAANQAAADVAAAA1gAAANcAAADYAAAA2QAAANoAAADbAAAA3AAAAN0AAADeAAAA3wAAAOAAAADhAAAA"
    "4gAAAOMAAADkAAAA5QAAAOYAAADnAAAA6AAAAOkAAADqAAAA6wAAAOwAAADtAAAA7gAAAO8AAADwAAAA8QAAAPIAAADz"
    "AAAA9AAAAPUAAAD2AAAA9wAAAPgAAAD5AAAA+gAAAPsAAAD8AAAA/QAAAP4AAAD/AAAAACAAIMyBAC4uLgAwADEAMeKB"
    "hDIAMeKBhDQAMgAzADQANQA2ADcAOAA5AEEAQgBDAEQARQBGAEcASABJAEoASwBMAE0ATgBPAFAAUQBSAFMAVABUTQBV"
    "AFYAVwBYAFkAWgBhAGIAYwBjbQBmZgBmaQBmbABmw60Aa2cAw4AAw4EAw4IAw4MAw4QAw4gAw4kAw4oAw4sAw4wAw40A"
    "w44Aw48Aw5IAw5MAw5QAw5UAw5YAw5kAw5oAw5sAw5wAw6AAw6EAw6IAw6MAw6QAw6cAw6gAw6kAw6oAw6sAw6wAw60A"
    "w64Aw68Aw7EAw7IAw7MAw7QAw7UAw7YAw7kAw7oAw7sAw7wAxIcAxIkAxKgAxKkAxYQAxYYAxagAxakAx7kAyKgAyKkA"
    "zqkA4bq8AOG6vQDjgpkA44KaAOOCqwDjgq0A"
)


################################################################################
# safetensors reader

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
          "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


def _as_bytes(t):
    # byte-level comparison works for every dtype (torch.equal lacks some of them)
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_safetensors_reader_matches_package(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in DTYPES.items():
        raw = torch.randint(0, 256, (3, 5, 4 * dtype.itemsize), generator=g, dtype=torch.uint8)
        tensors[name] = (raw & 1 if dtype == torch.bool else raw).view(dtype)
        tensors[name + ".scalar"] = tensors[name][0, 0, :1].reshape(()).clone()
        tensors[name + ".empty"] = torch.empty((0, 7), dtype=dtype)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "config": json.dumps({"d": 3})})

    ours, reference = load_safetensors(path), load_file(str(path))
    assert ours.keys() == reference.keys() == tensors.keys()
    assert {ours[k].dtype for k in ours} == set(DTYPES.values())
    for k in reference:
        assert ours[k].dtype == reference[k].dtype and ours[k].shape == reference[k].shape, k
        assert torch.equal(_as_bytes(ours[k]), _as_bytes(reference[k])), k
    with safe_open(str(path), "pt") as f:
        assert load_safetensors_metadata(path) == f.metadata()
    assert json.loads(load_safetensors_metadata(path)["config"]) == {"d": 3}
    subset = load_safetensors(path, names=["BF16"])
    assert list(subset) == ["BF16"]
    assert torch.equal(_as_bytes(subset["BF16"]), _as_bytes(tensors["BF16"]))


def _raw_file(header, data=b"", length=None):
    blob = json.dumps(header).encode()
    return (len(blob) if length is None else length).to_bytes(8, "little") + blob + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("content, message", [
    (b"\x01\x00", "too short"),
    (_raw_file(GOOD, bytes(12), length=10**6), "header length"),
    ((5).to_bytes(8, "little") + b"{abc}" + bytes(4), "not valid UTF-8 JSON"),
    (_raw_file([1, 2]), "must be a JSON object"),
    (_raw_file({**GOOD, "a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
     "dtype 'F31'"),
    (_raw_file({**GOOD, "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(12)),
     "needs 12 bytes"),
    (_raw_file({**GOOD, "a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(12)),
     "shape"),
    (_raw_file({**GOOD, "b": {"dtype": "I8", "shape": [4], "data_offsets": [6, 10]}}, bytes(12)),
     "contiguous"),
    (_raw_file({**GOOD, "b": {"dtype": "I8", "shape": [4], "data_offsets": [10, 14]}}, bytes(14)),
     "contiguous"),
    (_raw_file(GOOD, bytes(10)), "truncated"),
    (_raw_file(GOOD, bytes(20)), "trailing"),
    (_raw_file({**GOOD, "__metadata__": {"format": 1}}, bytes(12)), "__metadata__"),
    (_raw_file({**GOOD, "a": {"dtype": "F32", "shape": [2]}}, bytes(12)), "exactly dtype"),
])
def test_safetensors_rejects_malformed(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)


def test_safetensors_well_formed_handmade_file_loads(tmp_path):
    # the malformed cases above are all variations of this valid file
    path = tmp_path / "good.safetensors"
    data = torch.tensor([1.5, -2.0]).numpy().tobytes() + bytes([1, 2, 3, 4])
    path.write_bytes(_raw_file(GOOD, data))
    tensors = load_safetensors(path)
    assert torch.equal(tensors["a"], torch.tensor([1.5, -2.0]))
    assert torch.equal(tensors["b"], torch.tensor([1, 2, 3, 4], dtype=torch.int8))


################################################################################
# Encoder


def test_relative_position_bucket_spot_values():
    rel = torch.tensor([-200, -128, -64, -20, -8, -7, -1, 0, 1, 7, 8, 20, 64, 127, 500])
    expected = [15, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 30, 31, 31]
    assert t5.relative_position_bucket(rel).tolist() == expected


def _hf_encoder(tmp_path, feed_forward_proj="gated-gelu", vocab_size=300, **save_kwargs):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, num_heads=6, d_ff=40, num_layers=2,
                      feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(tmp_path, **save_kwargs)
    return model


def _padded_batch(vocab_size, lengths, total):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (len(lengths), total), generator=g)
    mask = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("layout, feed_forward_proj", [
    ("single", "gated-gelu"), ("sharded", "gated-gelu"), ("embed_tokens", "gated-gelu"),
    ("single", "relu")])
def test_encoder_matches_transformers_fp32(tmp_path, layout, feed_forward_proj):
    from safetensors.torch import load_file, save_file

    save_kwargs = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    reference = _hf_encoder(tmp_path, feed_forward_proj, **save_kwargs)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (layout == "sharded")
    if layout == "embed_tokens":  # files may hold the tied embedding under the encoder's name
        weights = load_file(str(tmp_path / "model.safetensors"))
        weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
        save_file(weights, str(tmp_path / "model.safetensors"))
    ours = t5.T5Encoder.from_pretrained(tmp_path)
    # 150 tokens reach the log-spaced buckets and the shared far-distance bucket
    ids, mask = _padded_batch(300, [150, 37, 1], 150)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (3, 150, 32) and got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-4


def test_encoder_bf16_rounds_like_transformers(tmp_path):
    from transformers import T5EncoderModel

    reference = _hf_encoder(tmp_path)
    reference_bf16 = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = t5.T5Encoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids, mask = _padded_batch(300, [40, 12], 40)
    with torch.no_grad():
        exact = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        expected = reference_bf16(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
    assert got.dtype == torch.bfloat16
    bf16_error = (expected.float() - exact).abs()[mask].max()
    assert bf16_error > 1e-3  # bf16 rounding is visible at this scale ...
    # ... and ours rounds the same way (identical with transformers 5.23)
    assert (got.float() - expected.float()).abs()[mask].max() <= 0.1 * bf16_error


################################################################################
# Tokenizer

WORDS = ("the a an of and to in is was for on with as by at from that this it video text model "
         "token flexible coarse fine frame time cat dog ball red blue green sky tree water city "
         "night day balloon building floor camera slowly running").split()


def _vocab():
    """A small unigram vocabulary in T5's layout: <pad>, </s>, <unk>, then scored pieces."""
    rng = random.Random(0)
    pieces = ["▁"] + list(string.ascii_letters + string.digits + ".,;:!?'\"-()éèàçüößñ東")
    pieces += ["▁" + w for w in WORDS] + ["▁" + w[:3] for w in WORDS if len(w) > 4]
    pieces += [w[1:] for w in WORDS if len(w) > 3] + ["▁" + c for c in string.ascii_lowercase]
    pieces += ["fi", "▁fi", "é▁", "ing", "ed", "er"]
    pieces = list(dict.fromkeys(pieces))
    scored = [(p, -rng.randint(2, 24) / 2) for p in pieces]  # coarse scores: ties do happen
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + scored


def _hf_tokenizer(layout, normalizer, scheme="always"):
    """A T5-style tokenizer.json built with the `tokenizers` library, as a dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(_vocab(), unk_id=2, byte_fallback=False))
    base = normalizers.NFKC() if normalizer == "nfkc" else normalizers.Precompiled(SMALL_CHARSMAP)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    if layout == "legacy":
        tok.normalizer = base
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    elif layout == "plain":  # a minimal unigram tokenizer.json that keeps every space
        tok.normalizer = base
        tok.pre_tokenizer = metaspace
    else:
        tok.normalizer = normalizers.Sequence([base, normalizers.Strip(left=False, right=True),
                                               normalizers.Replace(Regex(" {2,}"), "▁")])
        tok.pre_tokenizer = metaspace
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in
                            ["<pad>", "</s>", "<unk>", "<extra_id_1>", "<extra_id_0>"]])
    # non-T5 added tokens, to cover the other matching rules of tokenizer.json
    tok.add_tokens([AddedToken("[SEP]", lstrip=True, rstrip=True, normalized=False),
                    AddedToken("ﬂow", normalized=True), AddedToken("dog", single_word=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    spec = json.loads(tok.to_str())
    if layout == "legacy":  # older serialisations: add_prefix_space, alone or with prepend_scheme
        meta = spec["pre_tokenizer"]["pretokenizers"][1]
        del meta["split"]
        meta["add_prefix_space"] = scheme != "never"
        if scheme == "always":
            del meta["prepend_scheme"]
    return spec


def _prompts(count=300):
    rng = random.Random(1)
    pool = (WORDS * 3 + list(string.ascii_letters + string.digits + ".,!?'-éèàçüößñÉÖ")
            + ["e\u0301", "a\u0308", "\u0301", "ﬁ\u0301", "ﬁ", "ﬂow"]
            + list("ＡＢ１２①Ⅻ㎏™½²…ｶﾞ東京日本語こんにちは😀")
            + [" ", "  ", "   "] + list("\t\n\r\x1c\x85\u00a0\u3000\u200b\ufeff\x01\x7f")
            + ["</s>", "<pad>", "<extra_id_0>", "<unk>", "<s>", "[SEP]", " [SEP] ", "dog", "hotdog"])
    fixed = ["", " ", "   ", "hello world", "  leading", "trailing  ", "a  b   c", "</s>", "x</s>y",
             "<pad><pad>", "A cat chasing a red balloon over the city at night, 4K.",
             "Ünïcödé façade café naïve", "12345 67890", "???", "東京", "😀😀 😀"]
    def random_prompt():
        return "".join(rng.choice(pool) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))
    return fixed + [random_prompt() for _ in range(count - len(fixed))]


@pytest.mark.parametrize("layout, normalizer, scheme", [
    ("legacy", "nfkc", "always"), ("legacy", "precompiled", "always"), ("legacy", "nfkc", "never"),
    ("new", "nfkc", "always"), ("new", "precompiled", "always"), ("new", "precompiled", "first"),
    ("plain", "nfkc", "always")])
def test_tokenizer_matches_tokenizers(layout, normalizer, scheme):
    from tokenizers import Tokenizer

    spec = _hf_tokenizer(layout, normalizer, scheme)
    reference, ours = Tokenizer.from_str(json.dumps(spec)), t5_tokenizer.T5Tokenizer(spec)
    prompts = _prompts()
    expected = [e.ids for e in reference.encode_batch(prompts)]
    assert [ours.encode(p) for p in prompts] == expected
    assert sum(2 in ids for ids in expected) > 20  # unknown characters were exercised

    # batch form: truncation keeps the final </s>, right padding with <pad> and a mask
    reference.enable_truncation(max_length=12)
    reference.enable_padding(pad_id=0, pad_token="<pad>", length=12)
    batch = reference.encode_batch(prompts[:40])
    ids, mask = ours(prompts[:40], max_length=12)
    assert ids.tolist() == [e.ids for e in batch]
    assert mask.tolist() == [[bool(m) for m in e.attention_mask] for e in batch]


def test_precompiled_normaliser_matches_tokenizers():
    from tokenizers import normalizers

    reference = normalizers.Precompiled(SMALL_CHARSMAP)
    ours = t5_tokenizer._Charsmap(SMALL_CHARSMAP)
    samples = [chr(c) for c in range(0x3100) if not 0xD800 <= c < 0xE000]
    samples += ["ＡＢＣ", "ﬁ\u0301x", "ﬁ\u0301\u0301", "e\u0301\u0301", "\r\n", "a\u200d",
                "x\u0600y", "\x01\u0301", "①\u0308", "ｶﾞｷﾟ", "\U0001F44D\U0001F3FD", "e\u0301" * 4]
    assert [ours(s) for s in samples] == [reference.normalize_str(s) for s in samples]
    # tokenizers replaces a whole cluster by its SHORTEST matching rule (ﬁ), losing the accent
    assert ours("ﬁ\u0301") == "fi" and ours("ﬁ") == "fi" and ours("e\u0301") == "é"


def test_tokenizer_pads_to_longest_and_truncates():
    tok = t5_tokenizer.T5Tokenizer(_hf_tokenizer("new", "nfkc"))
    ids, mask = tok(["the cat", "the " * 50], max_length=8, padding="longest")
    assert ids.shape == (2, 8) and ids[1, -1] == 1 and mask[1].all()
    ids, mask = tok(["the cat", "a"], max_length=64, padding="longest")
    assert ids.shape[1] == max(mask.sum(1)) < 64
    assert ids[~mask].eq(0).all()


################################################################################
# End to end and bad input


@pytest.fixture
def checkpoint(tmp_path):
    """A transformers-written T5 encoder directory with a tokenizer.json matching its vocabulary."""
    spec = _hf_tokenizer("new", "precompiled")
    reference = _hf_encoder(tmp_path, vocab_size=t5_tokenizer.T5Tokenizer(spec).vocab_size)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path, reference


def test_encode_text_matches_transformers(checkpoint):
    from tokenizers import Tokenizer

    path, reference = checkpoint
    prompts = ["A red balloon floats over the city at night.", "", "the " * 30, "東京 ﬁ\u0301 </s>"]
    reference_tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    reference_tok.enable_truncation(max_length=24)
    reference_tok.enable_padding(pad_id=0, pad_token="<pad>", length=24)
    batch = reference_tok.encode_batch(prompts)
    ids = torch.tensor([e.ids for e in batch])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=torch.tensor(
            [e.attention_mask for e in batch])).last_hidden_state

    features, mask = t5.T5Encoder.from_pretrained(path).encode_text(prompts, max_length=24)
    assert features.shape == (4, 24, 32) and mask.dtype == torch.bool
    assert mask.tolist() == [[bool(m) for m in e.attention_mask] for e in batch]
    assert (features - expected).abs().max() < 1e-4


def test_bad_input_is_rejected(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    model = t5.T5Encoder.from_pretrained(path)
    with pytest.raises(ValueError, match="empty"):
        model.encode_text([])
    with pytest.raises(ValueError, match="list of strings"):
        model.encode_text("a single string")
    with pytest.raises(ValueError, match="must all be strings"):
        model.encode_text(["ok", 3])
    with pytest.raises(ValueError, match="max_length"):
        model.encode_text(["ok"], max_length=1)
    with pytest.raises(ValueError, match="padding"):
        model.encode_text(["ok"], padding="left")
    with pytest.raises(ValueError, match="float16"):
        t5.T5Encoder.from_pretrained(path, dtype=torch.float16)
    with pytest.raises(ValueError, match="no tokenizer"):
        t5.T5Encoder(t5.T5Config.tiny()).encode_text(["ok"])

    other = tmp_path_factory.mktemp("other")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        t5.T5Encoder.from_pretrained(other / "missing")
    with pytest.raises(FileNotFoundError, match="config"):
        t5.T5Encoder.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        t5.T5Encoder.from_pretrained(other)
    config = json.loads((path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        t5.T5Encoder.from_pretrained(other)
    from safetensors.torch import save_file
    save_file({"blocks.0.weight": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="not a T5 encoder checkpoint"):
        t5.T5Encoder.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "d_ff": 64}))
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="config.json implies"):
        t5.T5Encoder.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    with pytest.raises(ValueError, match="wrong tokenizer.json"):
        t5.T5Encoder.from_pretrained(other, tokenizer=path / "tokenizer.json")
    with pytest.raises(ValueError, match="'BPE'"):
        t5_tokenizer.T5Tokenizer({"model": {"type": "BPE", "vocab": {}}})
