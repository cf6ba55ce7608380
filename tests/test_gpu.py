"""The GPU path checked against the CPU path's reference: compiled FlexAttention with block masks vs SDPA with the
same dense mask (forward and backward), the compiled tokenizer training step vs eager, flow decoding with both
attention backends, and the AR KV cache on CUDA.

Skipped where there is no CUDA GPU (CI has none). On a GPU machine: `python -m pytest -q tests/test_gpu.py`.
Everything runs in fp32 with TF32 off, so the two paths differ only by kernel summation order.
"""
import copy

import pytest
import torch

from transformer import Block, Layout, Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def close(a, b, rtol=1e-4):
    """Max abs difference within rtol of b's largest magnitude (scale-free, for outputs and gradients alike)."""
    return (a - b).abs().max().item() <= rtol * b.abs().max().item() + 1e-6


def forward_backward(model, x, layout, backend, weights):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x, layout)
    (out * weights).sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind, layout", [("causal_registers", Layout(5, 256, 256)), ("time_causal", Layout(5, 256, 256)),
                                          ("causal_registers", Layout(3, 16, 8)), ("time_causal", Layout(5, 64, 16))],
                         ids=str)
def test_compiled_flex_matches_dense_sdpa_forward_and_backward(kind, layout):
    """The two masks that run on FlexAttention ("full" is unmasked SDPA on both paths). Layout(5, 256, 256) is the
    d18-d18 sequence (S = 2560); the others are not multiples of the block mask's 128-token blocks, so its padded
    last block is exercised. Each case compiles for about 50 s on an H100."""
    torch.manual_seed(0)
    model = Transformer(128, 2, kind).to(CUDA)
    x = torch.randn(2, layout.length, 128, device=CUDA)
    weights = torch.randn_like(x)
    ref = forward_backward(model, x, layout, "sdpa", weights)
    out = forward_backward(model, x, layout, "flex", weights)
    assert close(out[0], ref[0]) and close(out[1], ref[1])
    assert all(close(a, b) for a, b in zip(out[2], ref[2]))


def test_compiled_tokenizer_step_matches_eager_sdpa():
    """One training step (losses and every gradient) of the tiny tokenizer: compiled blocks with FlexAttention,
    as train_tok.py runs on CUDA, vs eager blocks with dense SDPA masks, as on CPU. Same seed, same noise."""
    from tokenizer import TokenizerConfig, VideoFlexTok
    from trainer import compile_blocks

    cfg = TokenizerConfig.preset("tiny", max_frames=5)
    torch.manual_seed(0)
    eager = VideoFlexTok(cfg).to(CUDA)
    compiled = copy.deepcopy(eager)
    eager.set_attention_backend("sdpa")
    compile_blocks(compiled, Block)
    latents = torch.randn(4, cfg.latent_channels, cfg.max_frames, cfg.latent_size, cfg.latent_size, device=CUDA)
    target = torch.randn(4, cfg.max_frames, cfg.max_grid ** 2, cfg.repa_dim, device=CUDA)

    def step(model):
        torch.manual_seed(1)  # the same noise, t, nested-dropout k and null-condition draws for both
        losses = model(latents, repa_target=target)
        losses["loss"].backward()
        return {k: v.item() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}

    ref_losses, ref_grads = step(eager)
    losses, grads = step(compiled)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert ref_grads.keys() == grads.keys()
    bad = [n for n in ref_grads if ref_grads[n] is not None and not close(grads[n], ref_grads[n], rtol=1e-3)]
    assert not bad, f"gradients differ: {bad}"


def test_decoding_is_the_same_with_both_attention_backends():
    from tokenizer import TokenizerConfig, VideoFlexTok

    cfg = TokenizerConfig.preset("tiny", max_frames=5)
    torch.manual_seed(0)
    model = VideoFlexTok(cfg).to(CUDA).eval()
    ids = torch.randint(0, model.codebook_size, (2, cfg.max_frames, 4), device=CUDA)
    videos = {}
    for backend in ("sdpa", "flex"):
        model.set_attention_backend(backend)
        videos[backend] = model.decode(ids, steps=4, generator=torch.Generator(CUDA).manual_seed(3))
    assert close(videos["flex"], videos["sdpa"])


def test_ar_kv_cache_on_cuda_equals_recomputation_cpu_and_compiled():
    from ar import ARConfig, ARModel
    from generate import Sampler, generate

    cfg = ARConfig.preset("tiny", vocab=64, max_frames=3, tokens_per_frame=4, num_classes=5, dropout=0.0)
    torch.manual_seed(0)
    model = ARModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)  # a zero head would make every greedy sample 0
    cls = torch.arange(2)
    on_cpu = generate(model, cls=cls, temperature=0)
    model.to(CUDA)
    cached = generate(model, cls=cls.to(CUDA), temperature=0)
    full = generate(model, cls=cls.to(CUDA), temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(cached.cpu(), on_cpu)
    assert on_cpu.unique().numel() > 3
    # CUDA graphs (reduce-overhead): the same tokens as eager for the same seed, greedy and sampled with CFG.
    compiled = Sampler(model, 2, compile=True)
    for sampling in (dict(temperature=0), dict(cfg_scale=3.0, top_k=20)):
        draw = lambda s: s.generate(cls=cls.to(CUDA), **sampling,  # noqa: E731
                                    generator=torch.Generator(CUDA).manual_seed(5))
        assert torch.equal(draw(compiled), draw(Sampler(model, 2)))
    assert compiled.next is not compiled._next