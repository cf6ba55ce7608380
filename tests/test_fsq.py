"""FSQ: the 64000-code grid, id <-> code conversion and straight-through gradients."""
import pytest
import torch

from fsq import FSQ


def test_every_id_roundtrips():
    fsq = FSQ()
    assert fsq.codebook_size == 64000
    ids = torch.arange(64000)
    codes = fsq.ids_to_codes(ids)
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert len({tuple(c) for c in codes.tolist()}) == 64000  # all distinct
    assert codes.min() == -1 and codes.max() == 1


def test_levels_and_range():
    fsq = FSQ()
    codes, ids = fsq(torch.randn(4096, 6) * 5)
    assert codes.abs().max() <= 1
    even = {-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75}  # L=8: asymmetric grid
    odd = {-1, -0.5, 0, 0.5, 1}  # L=5
    assert set(codes[:, 0].tolist()) == even
    assert set(codes[:, 5].tolist()) == odd
    assert torch.equal(fsq.ids_to_codes(ids), codes)
    # First dimension least significant: one step along dim 0 is id + 1.
    assert fsq.codes_to_ids(torch.tensor([[-0.75, -1, -1, -1, -1, -1]])).item() == 1


def test_straight_through_gradient():
    fsq = FSQ()
    z = torch.randn(8, 6, requires_grad=True)
    codes, _ = fsq(z)
    codes.sum().backward()
    assert (z.grad.abs() > 0).all()


def test_float_input_under_bf16_autocast_is_quantized_in_fp32():
    fsq = FSQ()
    z = torch.randn(16, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, ids = fsq(z)
    assert codes.dtype == torch.float32
    assert torch.equal(fsq.ids_to_codes(ids), codes)


@pytest.mark.parametrize("bad", [torch.tensor([64000]), torch.tensor([-1]), torch.tensor([0.5])])
def test_bad_ids_are_refused(bad):
    with pytest.raises(ValueError, match="ids must be integers in"):
        FSQ().ids_to_codes(bad)
