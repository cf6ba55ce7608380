"""The AR model (ar.py): time-first order, KV cache vs recomputation, CFG, text padding, overfitting,
sizes and bad input."""
import math
import string

import pytest
import torch

import t5
from ar import ARConfig, ARModel, apply_rope, from_sequence, rope_tables, to_sequence
from generate import Sampler, generate, sample_logits

FRAMES, K, VOCAB = 3, 4, 64


def small_config(**overrides):
    base = dict(vocab=VOCAB, max_frames=FRAMES, tokens_per_frame=K, num_classes=5, dropout=0.0, text_dim=128)
    return ARConfig.preset("tiny", **{**base, **overrides})


def random_model(cfg, seed=0):
    """A model in eval mode with large random weights, the zero-initialised head included, so that
    samples depend on every input (a zero head predicts a uniform distribution and greedy decoding
    always picks 0; small weights make the last token dominate). Norm scales stay 1."""
    torch.manual_seed(seed)
    model = ARModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model


def conditions(model, B=2):
    """The generate() keyword arguments of a model's conditioning, for a batch of B."""
    kwargs = {}
    if model.cfg.num_classes:
        kwargs["cls"] = torch.arange(B) % model.cfg.num_classes
    if model.cfg.text != "none":
        kwargs["text"], kwargs["text_mask"] = model.encode_text(["a red ball bounces", "blue square"][:B])
    return kwargs


MODELS = {
    "class": dict(),
    "text": dict(num_classes=0, text="bytes"),
    "class+text": dict(text="bytes"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return random_model(small_config(**MODELS[request.param]))


################################################################################
# Order and positions

def test_time_first_round_trip_and_prefix():
    ids = torch.randint(0, 100, (2, 5, 8))
    seq = to_sequence(ids)
    assert torch.equal(from_sequence(seq, 5), ids)
    # sequence[n] is token n // T' of frame n % T': the first token of every frame, then the second...
    assert torch.equal(seq[0, :5], ids[0, :, 0]) and torch.equal(seq[0, 5:10], ids[0, :, 1])
    for k in (1, 3, 8):  # the first k*T' positions are exactly the first k tokens of every frame
        assert torch.equal(seq[:, :k * 5], to_sequence(ids[..., :k]))
        assert torch.equal(from_sequence(seq[:, :k * 5], 5), ids[..., :k])


def test_rope_is_identity_at_sos_and_relative():
    cos, sin = rope_tables(torch.arange(16))
    q, k = torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
    # Position 0 ([SOS]) is not rotated: its queries and keys keep their content (no zero rows).
    assert torch.equal(apply_rope(q, cos[:1], sin[:1]), q)
    # Scores depend only on the distance between positions.
    def score(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()
    assert torch.allclose(score(7, 3), score(12, 8), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)


def test_position_embedding_names_the_predicted_frame_and_token():
    model = ARModel(small_config())
    seq = torch.randint(0, VOCAB, (1, FRAMES * K - 1))
    captured = []
    hook = model.blocks[0].attn_norm.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(seq, torch.tensor([0]))
    hook.remove()
    sos = model.sos + model.class_emb.weight[0]
    tokens = torch.cat([sos[None], model.tok_emb(seq[0])])
    # Position n gets (token index n // T', frame n % T'): the axial grid (K, T') read in time-first order.
    assert torch.allclose(captured[0][0] - tokens, model.pos(K, FRAMES).flatten(0, 1), atol=1e-6)


def test_initial_loss_is_log_vocab_and_prefix_budgets_train():
    model = ARModel(small_config())
    ids = torch.randint(0, VOCAB, (2, FRAMES, K))
    for k in (1, K):  # the zero head predicts the uniform distribution, for any budget
        assert model.loss(ids[..., :k], torch.tensor([0, 1])).item() == pytest.approx(math.log(VOCAB), abs=1e-5)


################################################################################
# Sampling

@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_kv_cache_equals_recomputation(model, cfg_scale):
    kwargs = conditions(model)
    cached = generate(model, **kwargs, temperature=0, cfg_scale=cfg_scale)
    full = generate(model, **kwargs, temperature=0, cfg_scale=cfg_scale, use_cache=False)
    assert cached.shape == (2, FRAMES, K)
    assert torch.equal(cached, full)
    assert cached.unique().numel() > 3  # the random head makes the sequences non-trivial
    # Sampling with the same generator draws the same tokens too.
    sample = lambda cache: generate(model, **kwargs, cfg_scale=cfg_scale, top_k=20, use_cache=cache,  # noqa: E731
                                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample(True), sample(False))


def test_cache_accepts_several_positions_after_the_start(model):
    """A prefill, then a chunk of 4 positions, then single positions: the same as one full pass."""
    from ar import KVCache
    kwargs = conditions(model)
    sos, text = model.condition(2, kwargs.get("cls"), kwargs.get("text"), kwargs.get("text_mask"))
    seq = torch.randint(0, VOCAB, (2, 8))
    full = model.hidden(seq, FRAMES, sos, text)
    x = torch.cat([sos[:, None], model.tok_emb(seq)], 1)
    text_len = 0 if text is None else text[0].shape[1]
    caches = torch.nn.ModuleList(KVCache(2, model.cfg.depth, 12, text_len, torch.float32, "cpu") for _ in model.blocks)
    if text is not None:
        for block, cache in zip(model.blocks, caches):
            cache.text_k[:], cache.text_v[:], cache.text_mask[:] = block.cross.context(*text)
    parts = [model.trunk(x[:, a:b], torch.arange(a, b), FRAMES, caches=caches) for a, b in [(0, 3), (3, 7), (7, 8), (8, 9)]]
    # fp32 rounding: the chunks run other kernels than the full pass (4e-5 measured on values up to 3.4 with
    # the text branch on a 2-core x86 CPU); a cache that mixes up positions is off by O(1)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


def test_padded_batch_and_short_cache_give_the_same_tokens(model):
    """A Sampler made for more rows pads the batch (and the text to max_text_len); its tokens are those of
    an exact-size one, and a cache as long as the sequence gives the same as the model's longest."""
    kwargs = conditions(model)
    draw = lambda sampler, **kw: sampler.generate(**kwargs, **kw, cfg_scale=2.0, top_p=0.9,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(2))
    exact = draw(Sampler(model, 2), tokens_per_frame=2)
    sampler = Sampler(model, 5)
    assert torch.equal(draw(sampler, tokens_per_frame=2), exact)
    assert torch.equal(draw(sampler, tokens_per_frame=2), exact)  # the cache is reused: stale entries masked
    assert torch.equal(draw(Sampler(model, 2, length=FRAMES * 2), tokens_per_frame=2), exact)


def test_compiled_decoding_draws_the_eager_tokens():
    """torch.compile of both steps (a plain compile on CPU): the same tokens for the same seed, greedy and
    sampled with CFG and top-k."""
    model = random_model(small_config(depth=1, text="bytes"))
    kwargs = conditions(model)
    compiled = Sampler(model, 2, compile=True)
    for sampling in (dict(temperature=0), dict(cfg_scale=3.0, top_k=20)):
        draw = lambda sampler: sampler.generate(**kwargs, **sampling,  # noqa: E731
                                                generator=torch.Generator().manual_seed(5))
        assert torch.equal(draw(compiled), draw(Sampler(model, 2)))
    assert compiled.next is not compiled._next  # compiled, not fallen back to eager


def test_compile_failure_falls_back_to_eager(model, capsys, monkeypatch):
    """A torch.compile that fails at the first call (as without a C++ compiler): one line, then eager tokens."""
    kwargs = conditions(model)
    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")
    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    sampler = Sampler(model, 2, compile=True)
    assert torch.equal(sampler.generate(**kwargs, temperature=0), generate(model, **kwargs, temperature=0))
    out = capsys.readouterr().out
    assert out.count("torch.compile failed for the AR prefill step (RuntimeError: no C++ compiler); running it "
                     "eagerly") == 1 and out.count("torch.compile failed") == 2  # each step says it once


def test_guidance_changes_samples_and_scale_one_is_plain(model):
    kwargs = conditions(model)
    draw = lambda **kw: generate(model, **kwargs, **kw, generator=torch.Generator().manual_seed(1))  # noqa: E731
    plain = draw()
    assert torch.equal(draw(cfg_scale=1.0), plain)  # doubled batch, unconditional half has no effect
    assert not torch.equal(generate(model, **kwargs, temperature=0, cfg_scale=4.0),
                           generate(model, **kwargs, temperature=0))


def test_budget_and_frames_are_arguments(model):
    kwargs = conditions(model)
    full = generate(model, **kwargs, temperature=0)
    # Greedy decoding of k tokens per frame is the prefix of the full greedy sequence (time-first).
    assert torch.equal(generate(model, **kwargs, temperature=0, tokens_per_frame=2), full[..., :2])
    assert generate(model, **kwargs, frames=2, tokens_per_frame=3).shape == (2, 2, 3)


def test_sample_logits_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    noise = lambda: torch.rand(logits.shape, generator=g)  # noqa: E731
    assert set(sample_logits(logits, top_k=2, noise=noise()).tolist()) == {0, 1}
    # top_p 0.8: probabilities 0.64, 0.24, 0.09, ... -> the first two cover 0.88, the third is dropped.
    assert set(sample_logits(logits, top_p=0.8, noise=noise()).tolist()) == {0, 1}
    assert set(sample_logits(logits, temperature=100.0, noise=noise()).tolist()) == {0, 1, 2, 3, 4}
    assert sample_logits(logits[:1], temperature=0).item() == 0
    # The Gumbel-max draw follows softmax(logits): 0.636, 0.234, 0.086, 0.032, 0.012 (4000 draws: +-0.02).
    counts = sample_logits(logits, noise=noise()).bincount(minlength=5) / len(logits)
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.02)
    assert sample_logits(logits, noise=torch.zeros_like(logits)).tolist() == [0] * len(logits)  # u = 0: no nan


################################################################################
# Conditioning

def test_cross_attention_ignores_padded_text():
    model = random_model(small_config(num_classes=0, text="t5", text_dim=32, max_text_len=10))
    text = torch.randn(2, 10, 32)
    mask = torch.arange(10) < torch.tensor([[3], [7]])
    seq = torch.randint(0, VOCAB, (2, 6))
    logits = model(seq, text=text, text_mask=mask)
    changed = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    assert torch.equal(model(seq, text=changed, text_mask=mask), logits)
    valid_changed = text.clone()
    valid_changed[:, 0] += 1
    assert not torch.allclose(model(seq, text=valid_changed, text_mask=mask), logits, atol=1e-4)
    # Generation is unaffected by padding too.
    gen = lambda t: generate(model, text=t, text_mask=mask, temperature=0, cfg_scale=2.0)  # noqa: E731
    assert torch.equal(gen(text), gen(changed))


def test_t5_features_and_byte_encoder_share_the_interface():
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["▁", -2.0]]
    vocab += [[c, -3.0] for c in string.ascii_lowercase] + [["▁" + c, -2.5] for c in string.ascii_lowercase]
    spec = {"model": {"type": "Unigram", "unk_id": 2, "vocab": vocab},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "</s>"}}],
                               "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}}}
    encoder = t5.T5Encoder(t5.T5Config.tiny(), t5.T5Tokenizer(spec))
    model = random_model(small_config(num_classes=0, text="t5", text_dim=32, max_text_len=12))
    text, mask = model.encode_text(["a red cat", "dog"], t5=encoder)
    assert text.shape == (2, 8, 32) and mask.sum(1).tolist() == [8, 4]  # pieces + </s>, padded to the longest
    assert generate(model, text=text, text_mask=mask, tokens_per_frame=1).shape == (2, FRAMES, 1)

    byte_model = random_model(small_config(num_classes=0, text="bytes", max_text_len=8))
    text, mask = byte_model.encode_text(["ab", "é" * 10])
    # Bytes + an end token; "é" is two UTF-8 bytes; truncated at max_text_len - 1 bytes.
    assert text.shape == (2, 8, 128) and mask.sum(1).tolist() == [3, 8]
    # The byte encoder is part of the model and trains with it.
    byte_model.loss(torch.randint(0, VOCAB, (2, FRAMES, K)), text=text, text_mask=mask).backward()
    assert byte_model.text_encoder.embed.weight.grad.abs().sum() > 0


def test_condition_dropout_uses_the_null_condition():
    model = random_model(small_config(text="bytes", class_dropout=1.0))
    seq = torch.randint(0, VOCAB, (2, 5))
    text, mask = model.encode_text(["red", "blue"])
    model.train()  # dropout 0 in the trunk: only the condition dropout acts
    dropped = model(seq, torch.tensor([0, 1]), text, mask)
    model.eval()
    null_cls, null_text, null_mask = model.null_inputs(2, text)
    sos, ctx = model.condition(2, null_cls, null_text, null_mask)
    reference = model.head(model.hidden(seq, FRAMES, sos, ctx)).float()
    assert torch.allclose(dropped, reference, atol=1e-6)
    assert not torch.allclose(dropped, model(seq, torch.tensor([0, 1]), text, mask), atol=1e-4)


################################################################################
# Learning

def test_overfits_sequences_and_regenerates_them_from_their_class():
    torch.manual_seed(0)
    cfg = small_config(vocab=256, num_classes=4, class_dropout=0.0, max_frames=2)
    model = ARModel(cfg)
    ids = torch.randint(0, 256, (4, 2, K), generator=torch.Generator().manual_seed(3))
    cls = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = model.loss(ids, cls)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    model.eval()
    assert torch.equal(generate(model, cls, temperature=0), ids)
    assert torch.equal(generate(model, cls, temperature=0, tokens_per_frame=1), ids[..., :1])


################################################################################
# Sizes and bad input

# (preset, overrides) -> parameters in millions, measured on the meta device (see ar.py).
SIZES = [
    ("tiny", {}, 16.8), ("d12", {}, 183.9), ("d16", {}, 333.3), ("d28", {}, 1309.9),
    ("d16", {"num_classes": 0, "text": "t5"}, 402.9), ("d24", {"num_classes": 0, "text": "t5"}, 1108.6),
    ("d42", {"num_classes": 0, "text": "t5"}, 5213.3),
]


@pytest.mark.parametrize("name,overrides,millions", SIZES)
def test_preset_sizes(name, overrides, millions):
    with torch.device("meta"):
        model = ARModel(ARConfig.preset(name, **overrides))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
    assert model.cfg.width == 64 * model.cfg.depth and len(model.blocks) == model.cfg.depth


def test_bad_input_is_rejected():
    model = random_model(small_config(text="bytes"))
    text, mask = model.encode_text(["red", "blue"])
    cls = torch.tensor([0, 1])
    cases = [
        (lambda: generate(model, torch.tensor([0, 5]), text, mask), "unknown class id"),
        (lambda: generate(model, torch.tensor([-1, 0]), text, mask), "unknown class id"),
        (lambda: generate(model, None, text, mask), "cls must be"),
        (lambda: model.encode_text([]), "non-empty list"),
        (lambda: model.encode_text("a prompt"), "non-empty list"),
        (lambda: generate(model, cls, text, mask, tokens_per_frame=0), r"tokens_per_frame=0 must be in \[1, 4\]"),
        (lambda: generate(model, cls, text, mask, tokens_per_frame=K + 1), r"must be in \[1, 4\]"),
        (lambda: generate(model, cls, text, mask, frames=FRAMES + 1), "trained for 1 to 3 latent frames"),
        (lambda: model.loss(torch.zeros(2, FRAMES + 1, K, dtype=torch.long), cls, text, mask), "latent frames"),
        (lambda: model.loss(torch.full((2, FRAMES, K), VOCAB), cls, text, mask), r"ids must be in \[0, 64\)"),
        (lambda: generate(model, cls), "text must be features"),
        (lambda: generate(model, cls, text, torch.zeros_like(mask)), "without any valid position"),
        (lambda: generate(model, cls, text, mask, top_p=0.0), "top_p"),
        (lambda: model.check_vocabulary(1000), "do not belong together"),
        (lambda: generate(ARModel(small_config()).eval(), cls, text, mask), "no text conditioning"),
        (lambda: generate(ARModel(small_config(num_classes=0)).eval(), cfg_scale=2.0, batch=1), "neither"),
        (lambda: ARConfig.preset("d99"), "unknown AR preset"),
        (lambda: generate(model.train(), cls, text, mask), "model.eval()"),
        (lambda: Sampler(model.eval(), 1).generate(cls, text, mask), "larger than this Sampler's 1"),
        (lambda: Sampler(model, 2, length=5).generate(cls, text, mask), "do not fit this Sampler's cache of 5"),
        (lambda: Sampler(model, 2, length=FRAMES * K + 1), "length in"),
        (lambda: ARConfig(text="clip"), "ARConfig.text"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    model.check_vocabulary(VOCAB)  # the matching codebook passes


def test_tokenizer_pair_check():
    from tokenizer import TokenizerConfig, VideoFlexTok
    with torch.device("meta"):
        tok = VideoFlexTok(TokenizerConfig.preset("tiny"))  # 64000 codes, 17 frames x 16 tokens
        ARModel(ARConfig.preset("tiny")).check_tokenizer(tok)
        with pytest.raises(ValueError, match="do not belong together"):
            ARModel(small_config()).check_tokenizer(tok)
        with pytest.raises(ValueError, match="decodes at most"):
            ARModel(ARConfig.preset("tiny", tokens_per_frame=32)).check_tokenizer(tok)
