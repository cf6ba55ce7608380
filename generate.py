"""Sampling tokens from the AR model (ar.py): a KV cache of fixed size, one decode step with the
sampling inside it, eager or under `torch.compile`.

Paper: §3.3 and §4.3 (any prefix of the time-first sequence is a token budget), Appendix C.3 (order).
References (facts, not code): gpt-fast (pytorch-labs) for decoding without launch overhead -- a
cache as long as the whole sequence read through a position mask, a decode step compiled with
mode="reduce-overhead" (CUDA graphs), sampling inside the compiled step; LlamaGen (generate.py) for
classifier-free guidance on the logits and the top-k / top-p filters.

Usage:

    sampler = Sampler(model, batch=16, compile=True)     # reuse it: one compilation per setting
    ids = sampler.generate(cls, tokens_per_frame=32, cfg_scale=2.0, generator=g)   # (B, T', 32)
    ids = generate(model, cls, temperature=0)            # a one-off, eager

Why one shape. A step attends from the new position to keys in a cache of `length` positions
(default: the model's whole sequence, max_frames x K), masked to the positions written so far; the
batch is padded to the sampler's. So every step of every generation runs the same kernels on the
same shapes: CUDA graphs replay it, and the time per token does not grow along the sequence.

Randomness without a host round trip. The compiled step cannot take a `torch.Generator`, so each
token's uniform noise u (B, vocab) is drawn outside it, on the device, from the caller's generator,
and the step picks argmax(logits / T + g) with g = -log(-log(u)) (the Gumbel-max trick: token i
with probability softmax(logits / T)_i, the distribution torch.multinomial draws from). Eager and
compiled decoding share this code, so a seed gives the same tokens on both paths.

The first position ([SOS] + condition, which also writes the text's cross-attention keys into the
caches) and the later ones are two compiled functions; both run once per token and never read a
value back to the host.
"""
import torch

from ar import KVCache, check_condition, check_shape, from_sequence
from transformer import compile_or_eager


class Sampler:
    """Samples ids (B, frames, k) from `model` for batches of up to `batch` rows, through caches of
    `length` positions (default: the model's longest sequence). compile: torch.compile the steps
    (CUDA graphs on CUDA); where compilation fails the sampler says so once and runs eagerly."""

    def __init__(self, model, batch, length=None, compile=False):
        cfg = model.cfg
        self.model, self.batch = model, batch
        self.length = length or cfg.max_frames * cfg.tokens_per_frame
        if batch < 1 or not 1 <= self.length <= cfg.max_frames * cfg.tokens_per_frame:
            raise ValueError(f"Sampler needs batch >= 1 and length in [1, {cfg.max_frames * cfg.tokens_per_frame}]; "
                             f"got batch={batch}, length={length}")
        self.text_len = cfg.max_text_len if cfg.text != "none" else 0
        self.device = model.sos.device
        self.caches = {}  # rows (batch, or 2 x batch with CFG) -> the blocks' KVCaches
        self.first, self.next = self._first, self._next
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            options = dict(mode=mode, fullgraph=True, dynamic=False)
            self.first = compile_or_eager(self._first, "the AR prefill step", **options)
            self.next = compile_or_eager(self._next, "the AR decode step", **options)

    def generate(self, cls=None, text=None, text_mask=None, frames=None, tokens_per_frame=None, **sampling):
        """Ids (B, frames, tokens_per_frame): the first tokens_per_frame tokens of every frame.

        cls (B,) and/or text (B, L, text_dim) + text_mask (B, L) as the model was built for; frames
        defaults to max_frames, tokens_per_frame to K; `sampling`: the keyword arguments of `stream`.
        """
        for seq in self.stream(cls, text, text_mask, frames, tokens_per_frame, **sampling):
            pass
        return from_sequence(seq, self.model.cfg.max_frames if frames is None else frames)

    @torch.no_grad()
    def stream(self, cls=None, text=None, text_mask=None, frames=None, tokens_per_frame=None, batch=None,
               temperature=1.0, top_k=None, top_p=None, cfg_scale=None, generator=None, use_cache=True):
        """The loop of `generate`, one token at a time: yields the time-first sequence so far (B, n)
        after each of the frames x tokens_per_frame steps (a view into the output buffer).

        batch: the batch size of an unconditional model. temperature 0 is greedy; top_k keeps the k
        most likely tokens, top_p the smallest set holding probability top_p. cfg_scale None: the
        conditional branch only; a float s: the unconditional branch runs in the same (doubled)
        batch and logits = c + (s - 1)(c - u), which is u + s(c - u) and exactly c at s = 1.
        use_cache False recomputes the whole prefix for every token, eagerly (tests, benchmarks).
        """
        model = self.model
        frames, k = check_shape(model.cfg, frames, tokens_per_frame)
        B = self._check(cls, text, text_mask, batch, frames * k, temperature, top_k, top_p, cfg_scale)
        sos, context = model.condition(B, cls, text, text_mask)
        if cfg_scale is not None:
            null_sos, null_text = model.condition(B, *model.null_inputs(B, text))
        text = context
        settings = (frames, temperature, top_k, top_p, cfg_scale)
        out = torch.empty(B, frames * k, dtype=torch.long, device=self.device)
        if not use_cache:
            for n in range(frames * k):
                seq = out[:, :n]
                if cfg_scale is None:
                    h = model.hidden(seq, frames, sos, text)
                else:
                    h = torch.cat([model.hidden(seq, frames, sos, text),
                                   model.hidden(seq, frames, null_sos, null_text)])
                out[:, n] = _pick(model.head(h[:, -1]).float(), self._noise(B, temperature, generator), settings)
                yield out[:, :n + 1]
            return
        # Pad the batch to the sampler's (repeating the last row) and the text to max_text_len (masked).
        rows = torch.arange(self.batch, device=self.device).clamp(max=B - 1)
        sos, text = sos[rows], text and self._pad_text(text, rows)
        if cfg_scale is not None:
            null_text = null_text and self._pad_text(null_text, rows)
            sos, text = torch.cat([sos, null_sos[rows]]), text and tuple(map(torch.cat, zip(text, null_text)))
        caches = self._caches(sos.shape[0])
        pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # .clone(): a token feeds the next step, and a CUDA graph reuses its output buffer at its next replay
        token = self.first(caches, sos, text, pos, self._noise(B, temperature, generator), settings).clone()
        for n in range(frames * k):
            if n:
                pos += 1
                token = self.next(caches, token, pos, self._noise(B, temperature, generator), settings).clone()
            out[:, n] = token[:B]
            yield out[:, :n + 1]

    def _first(self, caches, sos, text, pos, noise, settings):
        """The first step: the [SOS] position, after writing the text's cross-attention keys into the caches."""
        if text is not None:
            for block, cache in zip(self.model.blocks, caches):
                for buffer, value in zip((cache.text_k, cache.text_v, cache.text_mask), block.cross.context(*text)):
                    buffer.copy_(value)
        return self._sample(caches, sos[:, None], pos, noise, settings)

    def _next(self, caches, token, pos, noise, settings):
        """Every later step: the previous token in, the next one out."""
        x = self.model.tok_emb(token)[:, None]
        if settings[-1] is not None:  # CFG: the unconditional rows continue the same tokens
            x = torch.cat([x, x])
        return self._sample(caches, x, pos, noise, settings)

    def _sample(self, caches, x, pos, noise, settings):
        h = self.model.trunk(x, pos, settings[0], caches=caches)
        return _pick(self.model.head(h[:, 0]).float(), noise, settings)

    def _caches(self, rows):
        if rows not in self.caches:
            m = self.model
            self.caches[rows] = torch.nn.ModuleList(
                KVCache(rows, m.cfg.depth, self.length, self.text_len, m.sos.dtype, self.device) for _ in m.blocks)
            if self.device.type == "cuda" and self.first is not self._first:
                for buffer in self.caches[rows].buffers():  # CUDA graphs write these in place, at fixed addresses
                    torch._dynamo.mark_static_address(buffer)
        return self.caches[rows]

    def _pad_text(self, text, rows):
        features, mask = text[0][rows], text[1][rows]
        pad = self.text_len - features.shape[1]
        return (torch.nn.functional.pad(features, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad)))

    def _noise(self, B, temperature, generator):
        """Uniform noise (batch, vocab) for one token: B rows from the generator, padding rows constant."""
        if temperature == 0:
            return None
        u = torch.rand(B, self.model.cfg.vocab, generator=generator, device=self.device)
        return torch.cat([u, u.new_full((self.batch - B, u.shape[1]), 0.5)]) if B < self.batch else u

    def _check(self, cls, text, text_mask, batch, n_tokens, temperature, top_k, top_p, cfg_scale):
        """Everything a generation is given, checked once as it starts (the model takes it as checked);
        -> the batch size."""
        model = self.model
        if model.training:
            raise ValueError("sampling needs model.eval(): in training mode dropout and condition dropout act")
        B = _batch_of(cls, text, batch)
        if B is None or B < 1:
            raise ValueError(f"batch must be >= 1 for an unconditional model; got {batch}")
        if B > self.batch:
            raise ValueError(f"a batch of {B} is larger than this Sampler's {self.batch}: make it with batch={B}")
        if n_tokens > self.length:
            raise ValueError(f"{n_tokens} tokens do not fit this Sampler's cache of {self.length}: "
                             f"make it with length={n_tokens} (or None, the model's longest sequence)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if top_k is not None and not 1 <= top_k <= model.cfg.vocab:
            raise ValueError(f"top_k must be None or in [1, {model.cfg.vocab}]; got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1]; got {top_p}")
        if cfg_scale is not None and cfg_scale < 0:
            raise ValueError(f"cfg_scale must be None (no guidance) or >= 0; got {cfg_scale}")
        if cfg_scale is not None and model.class_emb is None and model.cfg.text == "none":
            raise ValueError("cfg_scale needs a class- or text-conditioned model; this one has neither")
        check_condition(model.cfg, B, cls, text, text_mask)
        return B


def generate(model, cls=None, text=None, text_mask=None, frames=None, tokens_per_frame=None, batch=None, **sampling):
    """One eager generation: `Sampler(model, B).generate(...)` (see `Sampler.stream` for `sampling`)."""
    sampler = Sampler(model, _batch_of(cls, text, batch) or 1)
    return sampler.generate(cls, text, text_mask, frames, tokens_per_frame, batch=batch, **sampling)


def _batch_of(cls, text, batch):
    """The batch size of a condition: that of cls or text, else `batch` (an unconditional model)."""
    return next((x.shape[0] for x in (cls, text) if torch.is_tensor(x)), batch)


def _pick(logits, noise, settings):
    """CFG on the doubled batch's logits, then one token per conditional row."""
    _, temperature, top_k, top_p, cfg_scale = settings
    if cfg_scale is not None:
        c, u = logits.chunk(2)
        logits = c + (cfg_scale - 1) * (c - u)
    return sample_logits(logits, temperature, top_k, top_p, noise)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, noise=None):
    """One token id per row of logits (B, V): greedy at temperature 0, else temperature, top-k, top-p,
    and a Gumbel-max draw with uniform noise (B, V) (see the module docstring)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already hold top_p: the most likely always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # u = 0 gives g = -inf (never picked), never nan; filtered tokens stay at -inf.
    return (logits - (-noise[:logits.shape[0]].log()).log()).argmax(-1)
