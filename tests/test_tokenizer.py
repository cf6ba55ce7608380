"""Encoder, decoder and the VideoFlexTok API: causality, nested dropout, guidance, sizes, bad input."""
import re

import pytest
import torch

from decoder import APG, guide, repa_loss, sample_keep_k
from transformer import Transformer, sincos_2d, use_checkpointing
from vae import PixelVAE
from tokenizer import TokenizerConfig, VideoFlexTok, budget_psnr, choose_budgets, greedy_budgets


def small_config(**overrides):
    """A tiny tokenizer on 3-channel 16x16 'latents' with 5 latent frames and 8 registers."""
    base = dict(latent_size=16, max_frames=5, registers=8, repa_dim=32, null_cond_prob=0.0)
    return TokenizerConfig.preset("tiny", **{**base, **overrides})


def random_model(cfg, seed=0):
    """A model whose every weight is random, zero-initialised layers included: at init the encoder
    head and decoder output are zero, which would make causality tests pass vacuously."""
    torch.manual_seed(seed)
    model = VideoFlexTok(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())


def latents(B=2, T=5, seed=1, size=16):
    return torch.randn(B, 3, T, size, size, generator=torch.Generator().manual_seed(seed))


def test_encode_shapes_and_range(model):
    ids = model.encode(latents())
    assert ids.shape == (2, 5, 8) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 64000
    assert ids.unique().numel() > 10  # random weights spread the tokens over the codebook


def test_encoder_is_time_causal(model):
    x = latents()
    for t in range(4):
        y = x.clone()
        y[:, :, t + 1:] = torch.randn_like(y[:, :, t + 1:])
        a, b = model.encode(x), model.encode(y)
        assert torch.equal(a[:, :t + 1], b[:, :t + 1])
        assert not torch.equal(a[:, t + 1:], b[:, t + 1:])


def test_encoding_frame_by_frame_with_the_cache_equals_encoding_the_clip(model):
    x = latents()
    codes, ids = model.encoder(x)
    cache = model.encoder.frame_cache()
    frames = [model.encoder.encode_frame(x[:, :, t:t + 1], cache) for t in range(5)]
    assert torch.allclose(torch.cat([c for c, _ in frames], 1), codes, atol=1e-6)
    assert torch.equal(torch.cat([i for _, i in frames], 1), ids)
    with pytest.raises(ValueError, match="takes 5 latent frames per clip"):
        model.encoder.encode_frame(x[:, :, :1], cache)


def test_encoder_registers_are_causal(model):
    """Inside frame t, register i's output (before quantization) does not depend on the frame's
    registers > i; later frames may depend on all of frame t."""
    captured = []
    hook = model.encoder.to_codes.register_forward_hook(lambda m, i, o: captured.append(o))
    x = latents()
    saved = model.encoder.registers.data.clone()
    try:
        for t, i in [(0, 0), (2, 3), (4, 6)]:
            model.encoder(x)
            with torch.no_grad():
                model.encoder.registers[t, i + 1:] += torch.randn_like(saved[t, i + 1:])
            model.encoder(x)
            model.encoder.registers.data.copy_(saved)
            before, after = captured[-2], captured[-1]  # (B, T, K, 6)
            # Equal up to float summation order in the masked attention kernel.
            assert torch.allclose(before[:, :t], after[:, :t], atol=1e-4)
            assert torch.allclose(before[:, t, :i + 1], after[:, t, :i + 1], atol=1e-4)
            assert (before[:, t, i + 1:] - after[:, t, i + 1:]).abs().max() > 0.1
    finally:
        hook.remove()


def decode(model, ids, **kw):
    return model.decode(ids, steps=4, generator=torch.Generator().manual_seed(0), **kw)


def test_decoder_is_time_causal(model):
    ids = model.encode(latents())
    for t in range(4):
        other = ids.clone()
        other[:, t + 1:] = torch.randint(0, 64000, other[:, t + 1:].shape)
        a, b = decode(model, ids, guidance=3.0), decode(model, other, guidance=3.0)
        assert torch.allclose(a[:, :, :t + 1], b[:, :, :t + 1], atol=1e-5)
        assert not torch.allclose(a[:, :, t + 1:], b[:, :, t + 1:], atol=1e-3)


def test_decoding_a_prefix_ignores_the_dropped_tokens(model):
    ids = model.encode(latents())
    codes = model.encoder.fsq.ids_to_codes(ids)
    other = ids.clone()
    other[..., 3:] = torch.randint(0, 64000, other[..., 3:].shape)
    keep = torch.full((2,), 3)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.decoder.sample(codes, keep, (16, 16), steps=4, generator=gen())
    b = model.decoder.sample(model.encoder.fsq.ids_to_codes(other), keep, (16, 16), steps=4, generator=gen())
    assert torch.equal(a, b)
    # The public API decodes exactly the first k tokens of every frame.
    assert torch.equal(decode(model, ids[..., :3]), a)
    # ... and the tokens that are kept do matter.
    assert not torch.allclose(decode(model, ids[..., :4]), a)


def test_same_generator_same_output_and_different_seeds_differ(model):
    ids = model.encode(latents())
    assert torch.equal(decode(model, ids), decode(model, ids))
    other = model.decode(ids, steps=4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(decode(model, ids), other)


def test_guidance_rules():
    torch.manual_seed(0)
    v_c, v_u = torch.randn(2, 3, 5, 4, 4), torch.randn(2, 3, 5, 4, 4)
    cfg, _ = guide(v_c, v_u, 4.0)
    assert torch.allclose(cfg, v_u + 4.0 * (v_c - v_u), atol=1e-6)
    # APG without clipping or momentum and with eta = 1 keeps the whole difference: plain CFG.
    apg, _ = guide(v_c, v_u, 4.0, APG(momentum=0.0, norm_threshold=0.0, eta=1.0))
    assert torch.allclose(apg, cfg, atol=1e-5)
    # With eta = 0 the update is orthogonal to v_c, per sample and channel.
    apg, _ = guide(v_c, v_u, 4.0, APG(momentum=0.0, norm_threshold=0.0, eta=0.0))
    update = (apg - v_c) / 3.0
    assert ((update * v_c).sum(dim=(-3, -2, -1)).abs() < 1e-4).all()
    # Clipping bounds the difference's norm; momentum carries state from step to step.
    apg, running = guide(v_c, v_u, 2.0, APG(momentum=0.5, norm_threshold=0.6, eta=1.0))
    assert (torch.linalg.vector_norm(apg - v_c, dim=(-3, -2, -1)) <= 0.6 + 1e-5).all()
    _, running2 = guide(v_c, v_u, 2.0, APG(momentum=0.5), running)
    assert torch.allclose(running2, (v_c - v_u) + 0.5 * running)


def test_guided_decoding_runs_cfg_and_apg(model):
    ids = model.encode(latents())
    plain = decode(model, ids)
    cfg = decode(model, ids, guidance=5.0)
    apg = decode(model, ids, guidance=5.0, apg=APG())
    assert cfg.shape == apg.shape == plain.shape == (2, 3, 5, 16, 16)
    assert not torch.allclose(cfg, plain) and not torch.allclose(apg, cfg)
    assert torch.isfinite(apg).all()


def test_compiled_euler_step_decodes_what_eager_decodes():
    """Decoder.compile_sampling (a plain compile on CPU): the same latents as eager decoding, with CFG + APG and
    a clean prefix frame, and the step is the compiled one."""
    model = random_model(small_config(max_frames=2, latent_size=8, dec_depth=1))
    x = latents(T=2, size=8)
    ids = model.encode(x)[..., :3]
    kw = dict(guidance=3.0, apg=APG(momentum=0.5), prefix_latents=x[:, :, :1])
    eager = decode(model, ids, **kw)
    model.decoder.compile_sampling()
    try:
        compiled = decode(model, ids, **kw)
        assert "euler_step" in vars(model.decoder)  # the instance's compiled step, not the class's
    finally:
        del model.decoder.euler_step  # back to the class's eager step
    # fp32: the compiled kernels fuse and reorder sums; values reach ~20 with these random weights
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()


def test_prefix_frames_are_kept_clean(model):
    x = latents()
    ids = model.encode(x)
    out = decode(model, ids[..., :2], prefix_latents=x[:, :, :1])
    assert torch.equal(out[:, :, :1], x[:, :, :1])
    assert not torch.allclose(out[:, :, 1:], decode(model, ids[..., :2])[:, :, 1:])


@pytest.mark.parametrize("guidance, prefix", [(1.0, False), (3.0, False), (1.0, True), (3.0, True)],
                         ids=["plain", "cfg", "prefix", "cfg-prefix"])
def test_frame_by_frame_decoding_equals_joint_decoding(model, guidance, prefix):
    x = latents()
    ids = model.encode(x)[..., :3]
    kw = dict(guidance=guidance, prefix_latents=x[:, :, :1] if prefix else None)
    joint = decode(model, ids, **kw)
    frames = list(model.decode_frames(ids, steps=4, generator=torch.Generator().manual_seed(0), **kw))
    assert len(frames) == 5 and all(f.shape == (2, 3, 1, 16, 16) for f in frames)
    # The random weights make outputs of size ~20; what differs is fp32 rounding of other matrix shapes.
    assert (torch.cat(frames, 2) - joint).abs().max() <= 2e-6 * joint.abs().max()


def test_frame_by_frame_decoding_refuses_a_full_attention_decoder():
    model = random_model(small_config(dec_mask="full"))
    with pytest.raises(ValueError, match="time-causal decoder.*decode the clip jointly"):
        next(model.decode_frames(model.encode(latents())))


def test_adaptive_budgets_follow_the_target_or_spread_a_total():
    table = torch.tensor([[30.0, 31, 31.5, 31.6], [20, 25, 29, 33], [22, 22.5, 23, 23.2]])
    budgets = [1, 2, 4, 8]
    assert choose_budgets(table, budgets, target_psnr=29).tolist() == [1, 4, 8]   # the last reaches it at none
    # 9 tokens per frame in all: the big gains first (clip 2 up to 4), then the cheap ones that still fit.
    assert choose_budgets(table, budgets, total_tokens=9).tolist() == [2, 4, 2]
    assert choose_budgets(table, budgets, total_tokens=100).tolist() == [8, 8, 8]
    path = list(greedy_budgets(table, budgets))
    assert [tokens for _, tokens, _ in path] == sorted(tokens for _, tokens, _ in path)
    assert all(b[2] >= a[2] for a, b in zip(path, path[1:]))                     # every move gains
    with pytest.raises(ValueError, match="at least 3"):
        choose_budgets(table, budgets, total_tokens=2)


def test_per_clip_budgets_decode_each_clip_from_its_own_prefix(model):
    x = latents()
    ids = model.encode(x)
    mixed = decode(model, ids[..., :4], budget=torch.tensor([1, 4]))
    assert torch.allclose(mixed[:1], decode(model, ids[:, :, :1])[:1], atol=1e-5)
    assert torch.allclose(mixed[1:], decode(model, ids[..., :4])[1:], atol=1e-5)
    with pytest.raises(ValueError, match="budget must hold one"):
        decode(model, ids[..., :4], budget=torch.tensor([1, 5]))
    _, table = budget_psnr(model, PixelVAE(), x.clamp(-1, 1), steps=2)
    assert table.shape == (2, 4) and torch.isfinite(table).all()


def test_training_losses_and_gradients():
    model = random_model(small_config()).train()  # zero-init layers would block some gradients at step 0
    x = latents()
    target = torch.randn(2, 5, 16, 32)  # REPA target: (B, T', h*w, repa_dim) for a 4x4 patch grid
    losses = model(x, repa_target=target, prefix=torch.tensor([0, 1]))
    assert set(losses) == {"loss", "flow", "repa"}
    assert torch.allclose(losses["loss"], losses["flow"] + 0.5 * losses["repa"])
    losses["loss"].backward()
    for name in ["encoder.registers", "encoder.to_codes.weight", "decoder.head.weight",
                 "decoder.repa_head.out.weight", "decoder.mask_token", "decoder.prefix_token"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = random_model(small_config()).train()
    x, target = latents(), torch.randn(2, 5, 16, 32)

    def loss_and_grads(checkpointing):
        use_checkpointing(model, checkpointing)
        model.zero_grad()
        torch.manual_seed(3)  # the same noise levels, noise and nested-dropout draws for both runs
        loss = model(x, repa_target=target)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert all(t.checkpointing for t in model.modules() if isinstance(t, Transformer))
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("sampling, low_share", [("logit_normal", 0.014), ("uniform", 0.10)])
def test_training_noise_levels(sampling, low_share):
    """The decoder's training t: logit-normal puts 1.4% of clips at t < 0.1, uniform 10%."""
    cfg = small_config(time_sampling=sampling, latent_size=4, max_frames=1, registers=2, repa_dim=0)
    model = random_model(cfg).train()
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        model(latents(B=20000, T=1, size=4))
    t = seen[0]
    assert t.shape == (20000,) and 0 < t.min() and t.max() < 1
    assert abs((t < 0.1).float().mean().item() - low_share) < 0.005
    assert abs(t.median().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="time_sampling must be"):
        VideoFlexTok(small_config(time_sampling="normal"))


def test_prefix_frames_are_left_out_of_the_flow_loss():
    """With every frame but the last given clean, changing the clean frames' target-side content
    changes the loss only through the network's input, never through the loss mask."""
    torch.manual_seed(0)
    model = random_model(small_config(registers=4, max_frames=2))
    x = latents(T=2)
    codes, _ = model.encoder(x)
    torch.manual_seed(1)
    all_frames = model.decoder.loss(x, codes)["flow"]
    torch.manual_seed(1)
    with_prefix = model.decoder.loss(x, codes, prefix=torch.tensor([1, 1]))["flow"]
    # Recompute by hand: the flow loss over frame 1 only.
    torch.manual_seed(1)
    B = 2
    keep_k = sample_keep_k(B, 4, "pow2")
    torch.rand(B)  # null-condition draw (probability 0)
    regs = model.decoder.embed_registers(codes, keep_k, torch.tensor([1, 1]), torch.zeros(B, dtype=torch.bool))
    t = torch.sigmoid(torch.randn(B))
    eps = torch.randn_like(x)
    x_t = t.view(B, 1, 1, 1, 1) * eps + (1 - t.view(B, 1, 1, 1, 1)) * x
    sigma = (torch.rand(B) * 0.02 * (torch.rand(B) < 0.5)).view(B, 1, 1, 1, 1)
    x_t[:, :, :1] = (sigma * eps + (1 - sigma) * x)[:, :, :1]
    v = model.decoder(x_t, t, regs)
    expected = (v - (eps - x))[:, :, 1:].pow(2).mean()
    assert torch.allclose(with_prefix, expected, atol=1e-6)
    assert not torch.allclose(with_prefix, all_frames)


def test_nested_dropout_distributions():
    torch.manual_seed(0)
    assert set(sample_keep_k(2000, 256, "pow2").tolist()) == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert set(sample_keep_k(4000, 12, "uniform").tolist()) == set(range(1, 13))
    assert set(sample_keep_k(1000, 12, "pow2").tolist()) == {1, 2, 4, 8, 12}
    with pytest.raises(ValueError, match="nested dropout mode"):
        sample_keep_k(1, 8, "zipf")


def test_repa_loss_is_negative_cosine():
    a = torch.randn(2, 5, 16, 32)
    assert torch.allclose(repa_loss(a, 3 * a), torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(repa_loss(a, -a), torch.tensor(1.0), atol=1e-6)


def test_tokenize_and_detokenize_through_a_vae(model):
    class Halve:  # a stand-in latent space: 2x spatial downsampling
        def encode(self, video):
            return video[..., ::2, ::2]

        def decode(self, z):
            return z.repeat_interleave(2, -1).repeat_interleave(2, -2)

    video = latents(size=32)
    ids = model.tokenize(video, Halve())
    assert torch.equal(ids, model.encode(video[..., ::2, ::2]))
    out = model.detokenize(ids[..., :2], Halve(), steps=2)
    assert out.shape == video.shape


def test_tokenize_through_pixel_and_vidtok_vaes(model):
    from vae import PixelVAE, VidTokVAE
    video = latents(B=1, T=5).clamp(-1, 1)
    ids = model.tokenize(video, PixelVAE())
    assert torch.equal(ids, model.encode(video))
    assert model.detokenize(ids[..., :1], PixelVAE(), steps=2).shape == video.shape
    # A 16-channel tokenizer over a (tiny, random) VidTok: 17 frames at 64x64 -> 5 latent frames at 8x8.
    torch.manual_seed(0)
    tok = VideoFlexTok(small_config(latent_channels=16, latent_size=8, patch_size=1)).eval()
    vidtok = VidTokVAE("v1.0", ch=8).eval()
    clip = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    ids = tok.tokenize(clip, vidtok)
    assert ids.shape == (1, 5, 8)
    assert tok.detokenize(ids[..., :4], vidtok, steps=2).shape == clip.shape
    with pytest.raises(ValueError, match="16-channel latents but this tokenizer was built for 3"):
        model.tokenize(clip, vidtok)


@pytest.mark.parametrize("preset, trunks", [("d18-d18", [(1152, 18), (1152, 18)]),
                                            ("d18-d28", [(1152, 18), (1792, 28)])])
def test_parameter_counts_match_the_paper(preset, trunks):
    with torch.device("meta"):
        model = VideoFlexTok(TokenizerConfig.preset(preset))
    # The paper counts without adaLN; the REPA head is training-only and not part of the release.
    n = sum(p.numel() for name, p in model.named_parameters() if "adaLN" not in name and "repa_head" not in name)
    expected = sum(12 * w * w * d for w, d in trunks)
    assert abs(n - expected) / expected < 0.05
    published = {"d18-d18": 570e6, "d18-d28": 1.3e9}[preset]
    assert abs(n - published) / published < 0.06


def test_bad_input_names_the_problem(model):
    with pytest.raises(ValueError, match=r"latents must be a float tensor \(B, 3"):
        model.encode(torch.randn(2, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="latents must be a float tensor"):
        model.encode(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="T'=6 latent frames; this tokenizer takes 1 to 5"):
        model.encode(torch.randn(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model.encode(torch.randn(1, 3, 5, 18, 16))
    with pytest.raises(ValueError, match="at most 16"):
        model.encode(torch.randn(1, 3, 5, 32, 32))
    ids = torch.zeros(1, 5, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        model.decode(torch.zeros(1, 5, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        model.decode(torch.zeros(1, 5, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64000\)"):
        model.decode(ids + 64000)
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode(ids.float())
    with pytest.raises(ValueError, match="decodes 1 to 5"):
        model.decode(torch.zeros(1, 6, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_latents must have shape"):
        model.decode(ids, prefix_latents=torch.randn(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        TokenizerConfig.preset("d99")


def random_clips(n=16, frames=1, size=16, seed=0):
    """n clips (n, 3, T, size, size) of uniform random pixels in [-1, 1], static over time.

    Random pixels are the hard case for a tokenizer: nothing about a clip can be guessed from a
    noised version of its neighbourhood, so the decoder must rely on the tokens, and one token
    cannot carry a whole clip, so more tokens must give better reconstructions.
    """
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 1, size, size, generator=g) * 2 - 1).expand(-1, -1, frames, -1, -1).contiguous()


def overfit(cfg, clips, steps, lr=3e-3):
    """Train a tokenizer on one batch (pixels as latents) with a linearly decaying learning rate.
    Returns the model and its first and last flow loss."""
    model = VideoFlexTok(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    first = last = None
    for _ in range(steps):
        loss = model(clips)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return model.eval(), first, last


def reconstruction_errors(model, clips, budgets, steps=25):
    """Mean squared error of decoding the first k tokens per frame, for each k in budgets."""
    ids = model.encode(clips)
    errors = {}
    for k in budgets:
        recon = model.decode(ids[..., :k], steps=steps, generator=torch.Generator().manual_seed(0))
        errors[k] = (recon - clips).pow(2).mean().item()
    return errors


def test_tiny_tokenizer_overfits_and_its_tokens_carry_the_clips():
    """Sixteen random-pixel clips, 1500 CPU steps: the flow loss falls at least 5x, decoding from
    the tokens reconstructs the clips (far closer than an unrelated clip), and more tokens are not
    worse than one. One FSQ token (16 bits) already identifies each clip of a batch this small
    once the decoder has memorised it, so a strict coarse-to-fine trend is measured on training
    data the decoder cannot memorise (train_tok's validation), not here."""
    torch.manual_seed(0)
    cfg = TokenizerConfig.preset("tiny", latent_size=16, max_frames=1, registers=8, repa_dim=0, null_cond_prob=0.0)
    clips = random_clips()
    model, first, last = overfit(cfg, clips, steps=1500)
    assert last < first / 5
    errors = reconstruction_errors(model, clips, [1, 8], steps=10)
    chance = (clips - random_clips(seed=1)).pow(2).mean().item()  # an unrelated sample: ~0.67
    assert errors[8] < 0.05 * chance, errors
    assert errors[8] <= 1.05 * errors[1], errors


def test_checkpoints_load_with_or_without_the_training_only_repa_head(tmp_path):
    import dataclasses
    with_head = random_model(small_config())
    state = {"config": dataclasses.asdict(with_head.cfg), "model": with_head.state_dict(), "ema": None}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = VideoFlexTok.from_checkpoint(tmp_path / "ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), with_head.state_dict().values()))
    # Stage 2 without DINOv2 (no head) from a checkpoint trained with REPA, and the reverse.
    no_head = VideoFlexTok(small_config(repa_dim=0))
    no_head.load_checkpoint_weights(state, "ckpt.pt")
    assert torch.equal(no_head.decoder.head.weight, with_head.decoder.head.weight)
    VideoFlexTok(small_config()).load_checkpoint_weights({"model": no_head.state_dict(), "ema": None}, "ckpt.pt")
    # Anything else that does not fit is refused, and so is a file that is no checkpoint.
    with pytest.raises(ValueError, match="does not match the VideoFlexTok.*shape mismatches.*encoder.registers"):
        VideoFlexTok(small_config(registers=4)).load_checkpoint_weights(state, "ckpt.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a train_tok.py checkpoint"):
        VideoFlexTok.from_checkpoint(tmp_path / "other.pt")


def test_configs_of_earlier_checkpoints_load_and_settings_we_no_longer_compute_are_refused():
    import dataclasses
    stored = {**dataclasses.asdict(small_config()), "pos_embedding": "learnable_sum",
              "register_masks": ["nested", "prefix", "null"]}
    assert TokenizerConfig.from_dict(stored) == small_config()
    for name, value in [("pos_embedding", "learnable_prod"), ("register_masks", ["prefix", "nested", "null"])]:
        with pytest.raises(ValueError, match=re.escape(f"{name} = {value!r}; this version computes only {name} = ")):
            TokenizerConfig.from_dict({**stored, name: value})
    # The options an official file's defaults need are fields: kept as stored.
    official = {**stored, "register_pos_embedding": "sincos", "time_scale": 1.0}
    assert TokenizerConfig.from_dict(official) == small_config(register_pos_embedding="sincos", time_scale=1.0)
    with pytest.raises(ValueError, match="register_pos_embedding must be one of .*; got 'learnable_prod'"):
        VideoFlexTok(small_config(register_pos_embedding="learnable_prod"))


def test_sincos_register_positions_and_the_time_scale():
    """register_pos_embedding="sincos": a fixed (t, k) table, never squared, no learned vectors; time_scale
    scales the timestep sinusoid."""
    model = VideoFlexTok(small_config(register_pos_embedding="sincos", square_positions=True, time_scale=1.0))
    D = model.cfg.dec_width
    assert torch.equal(model.decoder.register_pos.table, sincos_2d(D, 5, 8))
    assert torch.equal(model.decoder.register_pos(2, 8), sincos_2d(D, 5, 8)[:2])
    assert not any("register_pos" in name for name, _ in model.named_parameters())
    assert [len(axis) for axis in model.decoder.pos.axes] == [5, 5, 5]   # the learned patch table is squared
    default = VideoFlexTok(small_config())
    torch.testing.assert_close(model.decoder.time.freqs * 1000.0, default.decoder.time.freqs)
    assert torch.isfinite(model(latents(B=1, T=2))["loss"])
