"""datalora.nf4 vs bitsandbytes (whose NF4 quantize/dequantize run on the CPU), the NF4
linear base and NF4 MoLoRALinear vs dequantize + reference."""

from __future__ import annotations

import pytest
import torch

from datalora import nf4

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def _no_dynamo():
    # bitsandbytes torch.compiles its fallback dequant (odd last dims); eager is the same math
    # and keeps these tests fast
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (torch.rand(shape[0], generator=g) * 3)[
        (...,) + (None,) * (len(shape) - 1)]
    w = w.to(dtype)
    w.view(-1)[: min(w.numel(), 40)] = 0  # an all-zero block (absmax 0)
    return w


def _bnb(w, blocksize, dq):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")


def _assert_same_as_bnb(t, data, state):
    assert torch.equal(t.data, data)
    assert torch.equal(t.absmax, state.absmax)
    assert t.shape == state.shape and t.dtype == state.dtype and t.blocksize == state.blocksize
    assert t.double_quant == state.nested
    if state.nested:
        assert torch.equal(t.nested_absmax, state.state2.absmax)
        assert torch.equal(t.nested_code, state.state2.code)
        assert torch.equal(t.offset, state.offset)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (64, 128),        # whole blocks
    (7,),             # fewer values than one block, odd numel
    (33, 66),         # numel not a multiple of the block
    (3, 5, 9),        # 3-D, odd last dim (bnb's generic fallback path)
    (300, 257),       # > 256 absmax blocks: several nested blocks, odd last dim
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_bit_exact(shape, blocksize, double_quant, dtype):
    w = _weight(shape, dtype)
    data, state = _bnb(w, blocksize, double_quant)
    t = nf4.quantize(w, blocksize, double_quant)
    _assert_same_as_bnb(t, data, state)
    ref = F.dequantize_4bit(data, state, quant_type="nf4")
    out = nf4.dequantize(t, dtype=None)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("blocksize", [32, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_other_blocksizes_bit_exact(blocksize, double_quant):
    w = _weight((96, 1000), torch.bfloat16, seed=blocksize)
    data, state = _bnb(w, blocksize, double_quant)
    t = nf4.quantize(w, blocksize, double_quant)
    _assert_same_as_bnb(t, data, state)
    assert torch.equal(nf4.dequantize(t, None), F.dequantize_4bit(data, state, quant_type="nf4"))


def test_dequantize_other_dtype_is_fp32_value_rounded():
    w = _weight((40, 72), torch.float32)
    t = nf4.quantize(w, 64, True)
    full = nf4.dequantize(t, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(nf4.dequantize(t, dtype), full.to(dtype))
    # the quantization error is bounded by half the largest NF4 gap times absmax
    err = (full - w).abs().view(-1)
    assert err.max() <= 0.5 * 0.3039 * w.abs().max()


def test_dynamic_map_matches_bnb():
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


def test_from_bnb_shares_storage_and_round_trips():
    w = _weight((48, 80), torch.float16)
    lin = bnb.nn.Linear4bit(80, 48, bias=False, compute_dtype=torch.float16,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=64)
    # Params4bit quantizes when moved to a device; on the CPU that is its own quantize path
    lin.weight = lin.weight._quantize("cpu") if not lin.weight.bnb_quantized else lin.weight
    param = lin.weight
    t = nf4.NF4Tensor.from_bnb(param)
    assert t.data.data_ptr() == param.data_ptr()
    assert t.absmax.data_ptr() == param.quant_state.absmax.data_ptr()
    assert t.double_quant and t.shape == (48, 80)
    ref = F.dequantize_4bit(param.data, param.quant_state, quant_type="nf4")
    assert torch.equal(nf4.dequantize(t, None), ref)
    # our quantizer gives the same bytes as bnb's Params4bit path
    _assert_same_as_bnb(nf4.quantize(w, 64, True), param.data, param.quant_state)
    # to_bnb: a Params4bit bitsandbytes dequantizes to the same tensor, no copy
    back = t.to_bnb()
    assert back.data_ptr() == t.data.data_ptr()
    assert torch.equal(F.dequantize_4bit(back.data, back.quant_state, quant_type="nf4"), ref)
    # the (data, QuantState) form
    t2 = nf4.NF4Tensor.from_bnb((param.data, param.quant_state))
    assert torch.equal(nf4.dequantize(t2), nf4.dequantize(t))


def test_from_bnb_rejects_fp4_and_garbage():
    w = _weight((16, 64), torch.float32)
    data, state = F.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        nf4.NF4Tensor.from_bnb((data, state))
    with pytest.raises(TypeError, match="param"):
        nf4.NF4Tensor.from_bnb(torch.zeros(3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(w=torch.zeros(4, dtype=torch.int32)), "w: expected dtype"),
    (dict(w=torch.zeros(0)), "w: expected a non-empty"),
    (dict(w=torch.zeros(64), blocksize=48), "blocksize: expected one of"),
    (dict(w=torch.zeros(64), blocksize=True), "blocksize: expected one of"),
])
def test_quantize_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize(**kwargs)


def test_nf4tensor_validates_fields():
    t = nf4.quantize(torch.randn(10, 64))
    with pytest.raises(ValueError, match="absmax: expected 10 blocks"):
        nf4.NF4Tensor(t.data, t.absmax[:3], t.shape, t.dtype, 64)
    with pytest.raises(ValueError, match="data: expected 320"):
        nf4.NF4Tensor(t.data[:5], t.absmax, t.shape, t.dtype, 64)
    with pytest.raises(ValueError, match="nested_absmax, nested_code, offset"):
        nf4.NF4Tensor(t.data, t.absmax, t.shape, t.dtype, 64, nested_absmax=t.absmax)
    with pytest.raises(ValueError, match="dtype"):
        nf4.dequantize(t, torch.int8)
    with pytest.raises(TypeError, match="t: expected an NF4Tensor"):
        nf4.dequantize(torch.zeros(3))
