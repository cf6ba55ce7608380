"""Masks, attention backends and shared layers of transformer.py."""
import warnings

import pytest
import torch

from transformer import (AxialPositionEmbedding, Block, Layout, Transformer, attention_mask, dense_mask, patchify,
                         sincos_2d, unpatchify)

LAYOUTS = [Layout(1, 4, 3), Layout(3, 4, 2), Layout(5, 16, 8), Layout(2, 9, 0), Layout(4, 1, 5)]


def loop_mask(kind, layout):
    """The paper's rules written as plain loops over (frame, position) pairs, independent of mask_mod."""
    T, P, R = layout.frames, layout.patches, layout.registers
    tokens = [(t, kind_, i) for t in range(T) for kind_, n in (("p", P), ("r", R)) for i in range(n)]
    S = len(tokens)
    mask = torch.zeros(S, S, dtype=torch.bool)
    for a, (tq, kq, iq) in enumerate(tokens):
        for b, (tk, kk, ik) in enumerate(tokens):
            if kind == "full":
                ok = True
            elif kind == "time_causal":
                ok = tk <= tq
            else:  # causal_registers
                if tk < tq:
                    ok = True
                elif tk > tq:
                    ok = False
                elif kq == "p":
                    ok = kk == "p"  # patches see the frame's patches only
                else:
                    ok = kk == "p" or ik <= iq  # register i: patches and registers <= i
            mask[a, b] = ok
    return mask


@pytest.mark.parametrize("kind", ["causal_registers", "time_causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_masks_equal_loop_reference(kind, layout):
    assert torch.equal(dense_mask(kind, layout), loop_mask(kind, layout))


@pytest.mark.parametrize("kind", ["causal_registers", "time_causal", "full"])
@pytest.mark.parametrize("layout", [Layout(3, 16, 8), Layout(5, 16, 16), Layout(2, 64, 16)], ids=str)
def test_flex_attention_matches_sdpa(kind, layout):
    torch.manual_seed(0)
    model = Transformer(128, 2, kind).eval()
    x = torch.randn(2, layout.length, 128)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        model.backend = "sdpa"
        ref = model(x, layout)
        model.backend = "flex"
        out = model(x, layout)
    assert (out - ref).abs().max() < 1e-5


def test_block_masks_are_cached_per_shape():
    a = attention_mask("time_causal", Layout(3, 16, 8), "cpu", "flex")
    assert attention_mask("time_causal", Layout(3, 16, 8), "cpu", "flex") is a
    assert attention_mask("time_causal", Layout(4, 16, 8), "cpu", "flex") is not a
    for backend in ("sdpa", "flex"):  # full attention is unmasked SDPA on both: the fastest kernel
        assert attention_mask("full", Layout(3, 16, 8), "cpu", backend) is None


def test_adaln_zero_block_starts_as_identity_and_modulates_groups_separately():
    torch.manual_seed(0)
    layout = Layout(2, 3, 2)
    block = Block(64, cond_dim=16, groups=2)
    x, cond = torch.randn(1, layout.length, 64), torch.randn(1, 16)
    mask = attention_mask("time_causal", layout, "cpu", "sdpa")
    assert torch.equal(block(x, mask, layout, cond), x)
    # Open only the register group's MLP gate: patch tokens must stay unchanged.
    with torch.no_grad():
        block.adaLN.bias[6 * 64 + 64: 6 * 64 + 128] = 1.0  # group 1 (registers), chunk 1 (gate_mlp)
    out = block(x, mask, layout, cond)
    (p_in, r_in), (p_out, r_out) = layout.split(x), layout.split(out)
    assert torch.equal(p_in, p_out) and not torch.allclose(r_in, r_out)


def test_patchify_roundtrip():
    x = torch.randn(2, 5, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 3, 6, 80)
    assert torch.equal(unpatchify(patches, 4, 5, (2, 3)), x)
    # Raster order: patch 1 is the top row's second patch.
    assert torch.equal(patches[0, 0, 1].view(4, 4, 5), x[0, :, 0, :4, 4:8].permute(1, 2, 0))


def test_forward_with_features_gives_the_output_and_one_blocks_output():
    torch.manual_seed(0)
    layout = Layout(2, 4, 3)
    model = Transformer(64, 3, "time_causal", cond_dim=16, groups=2).eval()
    for p in model.parameters():  # adaLN-zero would make every block the identity
        torch.nn.init.normal_(p, std=0.1)
    x, cond = torch.randn(2, layout.length, 64), torch.randn(2, 16)
    mask = attention_mask("time_causal", layout, "cpu", "sdpa")
    with torch.no_grad():
        out, features = model.forward_with_features(x, layout, cond, 1)
        by_hand = model.blocks[1](model.blocks[0](x, mask, layout, cond), mask, layout, cond)
        assert torch.equal(out, model(x, layout, cond)) and torch.equal(features, by_hand)


def test_sincos_table_is_the_2d_sine_cosine_layout_and_takes_two_axes_only():
    table = sincos_2d(8, 4, 4)
    i, j, w = 3, 1, 1.0 / 10000.0 ** (torch.arange(2) / 2)
    assert torch.allclose(table[i, j], torch.cat([(i * w).sin(), (i * w).cos(), (j * w).sin(), (j * w).cos()]))
    assert sincos_2d(8, 3, 5).shape == (3, 5, 8)
    with pytest.raises(ValueError, match="sincos position embeddings need 2 axes"):
        AxialPositionEmbedding(8, (2, 4, 4), "sincos")
    with pytest.raises(ValueError, match="position embedding kind must be one of"):
        AxialPositionEmbedding(8, (2, 4), "learnable_prod")
