"""datalora.nf4 vs bitsandbytes (whose NF4 quantize/dequantize run on the CPU), the NF4
linear base and NF4 MoLoRALinear vs dequantize + reference."""

from __future__ import annotations

import warnings

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


def _bnb_dequantize(data, state):
    """bitsandbytes' ``dequantize_4bit`` semantics, computed by its portable implementation.

    Its native AVX-512 CPU kernel (bnb 0.50.2) decodes some row lengths wrongly: a [48, 80]
    fp32 weight at blocksize 64 comes back with max error 6.86 against 1.02 for the portable
    path and ours (Intel Xeon; an AMD EPYC without that kernel path agreed). The portable
    path is the block layout bitsandbytes' CUDA kernels use, so it is the reference here.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(data.view(torch.uint8).reshape(-1), absmax.float(),
                                    _get_4bit_code("nf4", data.device), state.blocksize,
                                    state.shape, state.dtype)


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
    ref = _bnb_dequantize(data, state)
    out = nf4.dequantize(t, dtype=None)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, ref)
    # the documented default is dtype=torch.bfloat16 (None: the weight's own dtype, above)
    bf16 = nf4.dequantize(t, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(nf4.dequantize(t), bf16) and torch.equal(t.dequantize(), bf16)
    assert torch.equal(t.dequantize(None), ref)


@pytest.mark.parametrize("blocksize", [32, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_other_blocksizes_bit_exact(blocksize, double_quant):
    w = _weight((96, 1000), torch.bfloat16, seed=blocksize)
    data, state = _bnb(w, blocksize, double_quant)
    t = nf4.quantize(w, blocksize, double_quant)
    _assert_same_as_bnb(t, data, state)
    assert torch.equal(nf4.dequantize(t, None), _bnb_dequantize(data, state))


@pytest.mark.parametrize("lead", [0, 64])
def test_a_short_last_block_divides_as_bitsandbytes(lead):
    """bitsandbytes divides a short last block by its absmax (full blocks: times the
    reciprocal); multiplying is one ulp off here, on the 14 | 15 boundary (0xff vs 0xfe)."""
    tail = torch.tensor([7.676315784454346, 6.612980607690417])
    assert tail[1] / tail[0] != tail[1] * (1.0 / tail[0])  # the ulp that matters
    w = torch.cat([torch.linspace(-1, 1, lead), tail])
    data, state = _bnb(w, 64, False)
    t = nf4.quantize(w, 64, False)
    _assert_same_as_bnb(t, data, state)
    assert t.data[-1].item() == 0xFF


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_cpu_decodes_a_large_weight_in_chunks_bit_for_bit(shape, blocksize, double_quant,
                                                             monkeypatch):
    """Over ``CPU_CHUNK`` values the CPU decodes whole blocks at a time into the output:
    the one-pass values in every dtype, a short last chunk and an odd count included."""
    t = nf4.quantize(_weight(shape, torch.float32), blocksize, double_quant)
    one_pass = {dtype: nf4.dequantize_torch(t, dtype) for dtype in DTYPES}
    chunk = 2 * blocksize
    monkeypatch.setattr(nf4, "CPU_CHUNK", chunk)
    decoded = []
    original = nf4._decode
    monkeypatch.setattr(nf4, "_decode",
                        lambda t, start, stop, scales: decoded.append((start, stop))
                        or original(t, start, stop, scales))
    for dtype in DTYPES:
        with torch.device("meta"):  # the output follows the weight, not the default device
            out = nf4.dequantize_torch(t, dtype)
        assert out.dtype == dtype and out.shape == t.shape and out.device == t.device
        assert torch.equal(out, one_pass[dtype])
    n = t.numel
    want = ([(a, min(a + chunk, n)) for a in range(0, n, chunk)] if n > chunk else [(0, n)])
    assert decoded == want * len(DTYPES)


def test_a_weight_over_one_chunk_dequantizes_as_bitsandbytes():
    w = _weight((1031, 1029), torch.bfloat16)  # > CPU_CHUNK values, odd sizes
    assert w.numel() > nf4.CPU_CHUNK
    data, state = _bnb(w, 64, True)
    t = nf4.quantize(w, 64, True)
    assert torch.equal(nf4.dequantize(t, None), _bnb_dequantize(data, state))


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
    ref = _bnb_dequantize(param.data, param.quant_state)
    assert torch.equal(nf4.dequantize(t, None), ref)
    # our quantizer gives the same bytes as bnb's Params4bit path
    _assert_same_as_bnb(nf4.quantize(w, 64, True), param.data, param.quant_state)
    # to_bnb: a Params4bit bitsandbytes dequantizes to the same tensor, no copy
    back = t.to_bnb()
    assert back.data_ptr() == t.data.data_ptr()
    assert torch.equal(_bnb_dequantize(back.data, back.quant_state), ref)
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


def test_quantize_double_quant_must_be_a_bool():
    with pytest.raises(TypeError, match="double_quant: expected a bool, got 'yes'"):
        nf4.quantize(torch.zeros(64), double_quant="yes")  # any truthy value counted


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
    # a negative shape whose product matches passed (then a RuntimeError in dequantize)
    with pytest.raises(ValueError, match=r"shape: expected non-negative sizes, got \(-10, -64\)"):
        nf4.NF4Tensor(t.data, t.absmax, (-10, -64), t.dtype, 64)
    # fields on two devices: a RuntimeError naming none of them
    split = nf4.NF4Tensor(t.data, t.absmax.to("meta"), t.shape, t.dtype, 64)
    with pytest.raises(ValueError, match=r"t.absmax: expected device cpu \(data's\), got meta"):
        nf4.dequantize(split)


def test_nf4tensor_validates_double_quant_fields():
    t = nf4.quantize(torch.randn(10, 64), 64, True)   # 10 blocks: one nested block
    kw = dict(nested_absmax=t.nested_absmax, nested_code=t.nested_code, offset=t.offset)

    def build(**changes):
        return nf4.NF4Tensor(t.data, changes.pop("absmax", t.absmax), t.shape, t.dtype, 64,
                             **{**kw, **changes})

    build()  # the fields as quantize gives them
    with pytest.raises(ValueError, match="nested_absmax: expected 1 values, got 2"):
        build(nested_absmax=torch.ones(2))
    with pytest.raises(ValueError, match="offset: expected one value"):
        build(offset=torch.zeros(2))
    with pytest.raises(ValueError, match="nested_code: expected 256 values"):
        build(nested_code=t.nested_code[:255])
    with pytest.raises(ValueError, match="absmax: expected uint8"):
        build(absmax=t.absmax.float())


# --------------------------------------------------------------------------- NF4 base layers
from datalora import MoLoRALinear  # noqa: E402
from datalora.nf4_linear import NF4Linear, nf4_weight  # noqa: E402
from datalora.reference import molora_delta_reference  # noqa: E402
from datalora.routing import Routing  # noqa: E402


def _linear(d_in, d_out, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out, bias=bias).to(dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_nf4linear_forward_backward(double_quant, bias):
    lin = _linear(72, 40, bias)
    q = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    w = nf4.dequantize(nf4.quantize(lin.weight.detach(), 64, double_quant), torch.float32)
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(2, 3, 72, requires_grad=True)
    y = q(x)
    ref = torch.nn.functional.linear(x, w, lin.bias)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, g @ w, atol=1e-5, rtol=1e-5)
    # the quantized weight is frozen state, not a parameter
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []


def test_nf4linear_state_dict_round_trip_and_device_move():
    q = NF4Linear.from_linear(_linear(64, 24, dtype=torch.bfloat16), double_quant=True)
    sd = q.state_dict()
    assert {"weight_data", "weight_absmax", "weight_nested_absmax", "weight_offset"} <= set(sd)
    q2 = NF4Linear.from_linear(_linear(64, 24, dtype=torch.bfloat16, seed=1))
    q2 = NF4Linear(nf4.quantize(torch.zeros(24, 64), 64, True), torch.zeros(24))
    q2.load_state_dict(sd)
    assert q2.weight.dtype == torch.bfloat16
    assert torch.equal(q2.dequantize(), q.dequantize())
    moved = q.to("cpu")
    assert moved.weight.device.type == "cpu"


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_dtype_casts_keep_fp32_scales_and_set_the_compute_dtype(double_quant):
    """``.to(bf16)`` / ``.half()`` / ``.float()`` cast the bias and set the compute dtype but
    leave the scales fp32 (bitsandbytes' format; the CUDA kernels read them as float*)."""
    q = NF4Linear.from_linear(_linear(64, 24), double_quant=double_quant)
    scales = {n: b.clone() for n, b in q.named_buffers()}
    want = q.dequantize(torch.float32)
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16),
                        (lambda m: m.half(), torch.float16), (lambda m: m.float(), torch.float32)):
        cast(q)
        assert q.compute_dtype == dtype and q.bias.dtype == dtype
        assert all(torch.equal(b, scales[n]) and b.dtype == scales[n].dtype
                   for n, b in q.named_buffers())
        assert torch.equal(q.dequantize(torch.float32), want)
        assert q(torch.randn(3, 64, dtype=dtype)).dtype == dtype
    q.to("cpu")  # a move alone keeps the compute dtype
    assert q.compute_dtype == torch.float32


def test_molora_nf4_layer_with_bf16_base_and_fp32_adapter():
    """What ``datalora.train`` does with ``bf16=True``: the layer in fp32, then its NF4 base
    in bf16; the forward used to fail (bf16 absmax) and the CUDA decode read bf16 scales."""
    layer = MoLoRALinear(_linear(64, 32), num_experts=2, rank=4, top_k=1, quantize="nf4")
    layer.float()
    layer.base_layer.to(torch.bfloat16)
    assert layer.base_layer.weight.absmax.dtype == torch.float32
    y = layer(torch.randn(3, 64))
    y.sum().backward()
    assert y.dtype == torch.float32 and layer.lora_B.grad is not None


def _routing(T, E, k, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g)
    rs = torch.rand(T, r, generator=g)
    return Routing(expert_ids=ids, gates=gates, rank_scale=rs)


def _molora_reference(layer, w, x, routing):
    return (torch.nn.functional.linear(x, w, layer.bias)
            + molora_delta_reference(x, layer.lora_A, layer.lora_B, routing.expert_ids,
                                     routing.gates, routing.rank_scale, layer.scaling))


@pytest.mark.parametrize("T, E, r, k", [
    (1, 4, 8, 2),    # T = 1 (decode)
    (7, 3, 4, 3),    # k = E (dense mixture), odd T
    (12, 5, 1, 1),   # r = 1 (SMoRA), prime E
])
def test_molora_nf4_forward_backward_matches_reference(T, E, r, k):
    layer = MoLoRALinear(_linear(96, 48), num_experts=E, rank=r, top_k=k, quantize="nf4")
    assert isinstance(layer.base_layer, NF4Linear)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero so the delta counts
    w = layer.base_layer.dequantize(torch.float32)
    x = torch.randn(T, 96, requires_grad=True)
    routing = _routing(T, E, k, r)
    y = layer(x, routing=routing)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _molora_reference(layer, w, x_ref, routing)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    grads_ref = torch.autograd.grad(ref, (x_ref, layer.lora_A, layer.lora_B), g)
    for got, want in zip(grads, grads_ref, strict=True):
        # fp32 sums in another order: error relative to the gradient's scale
        torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)
    # disabling the adapter leaves the NF4 base
    layer.adapter_enabled = False
    assert torch.equal(layer(x.detach()), torch.nn.functional.linear(x.detach(), w,
                                                                     layer.bias))


def test_molora_on_bnb_linear4bit_base():
    lin = _linear(128, 64)
    q = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32,
                          compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # quantizes
    layer = MoLoRALinear(q, num_experts=4, rank=4, top_k=2)
    assert layer.base_layer is q and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    w = nf4.dequantize(nf4.NF4Tensor.from_bnb(q.weight), torch.float32)
    x = torch.randn(5, 128, requires_grad=True)
    routing = _routing(5, 4, 2, 4)
    y = layer(x, routing=routing)
    torch.testing.assert_close(y, _molora_reference(layer, w, x, routing), atol=1e-5, rtol=1e-5)
    dx, dA = torch.autograd.grad(y.sum(), (x, layer.lora_A))
    x2 = x.detach().requires_grad_(True)
    dx_ref, dA_ref = torch.autograd.grad(_molora_reference(layer, w, x2, routing).sum(),
                                         (x2, layer.lora_A))
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dA, dA_ref, atol=1e-5, rtol=1e-5)
    # the wrapped NF4Linear view of the same bnb layer computes the same base output
    assert torch.allclose(NF4Linear.from_bnb(q)(x.detach()), q(x.detach()), atol=1e-5)


def test_nf4_inference_runs_molora_linear_over_the_dequantized_weight(monkeypatch):
    """Without a gradient the NF4 layer is one molora_linear (expand into the base GEMM's
    output); with one it stays base + delta, which re-dequantizes W in the backward."""
    from datalora import ops

    calls = []
    real = ops.molora_linear
    monkeypatch.setattr(ops, "molora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = _linear(128, 48)  # rows of whole blocks: bnb's AVX-512 CPU dequantize is right there
    q = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    for base in (NF4Linear.from_linear(lin), q):
        layer = MoLoRALinear(base, num_experts=4, rank=4, top_k=2)
        with torch.no_grad():
            layer.lora_B.normal_()
        w = nf4.dequantize(nf4_weight(base), torch.float32)
        x = torch.randn(2, 9, 128)
        routing = _routing(18, 4, 2, 4)
        with_grad = layer(x, routing=routing)
        assert calls == []
        with torch.no_grad():
            y = layer(x, routing=routing)
        assert calls == [1] and y.shape == (2, 9, 48)
        calls.clear()
        torch.testing.assert_close(y, with_grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.view(18, 48), _molora_reference(layer, w, x.view(18, 128),
                                                                     routing),
                                   atol=1e-5, rtol=1e-5)


def test_molora_rejects_bad_nf4_bases():
    with pytest.raises(ValueError, match="quantize: expected 'nf4'"):
        MoLoRALinear(_linear(64, 8), quantize="int8")
    fp4 = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(TypeError, match="quant_type 'nf4'"):
        MoLoRALinear(fp4)
    with pytest.raises(TypeError, match="base_layer: expected nn.Linear, NF4Linear"):
        MoLoRALinear(torch.nn.Conv1d(4, 4, 1))



def test_nf4_base_is_in_the_public_base_annotations():
    """``py.typed``: the annotated base of MoLoRALinear / SMoRALinear / smora_linear admits
    the NF4Linear they take (it was ``nn.Linear``, so a type checker rejected valid use)."""
    import typing

    from datalora.smora import SMoRALinear, smora_linear

    base = NF4Linear.from_linear(_linear(64, 8))
    for fn, param in ((MoLoRALinear.__init__, "base_layer"),
                      (SMoRALinear.__init__, "base_layer"), (smora_linear, "base")):
        hint = typing.get_type_hints(fn)[param]
        assert isinstance(base, hint) and isinstance(_linear(64, 8), hint), (fn, hint)
    assert smora_linear(base, 4, 2, 8.0).base_layer is base

def test_bench_nf4_smoke_writes_all_groups(tmp_path):
    from benchmarks import bench_nf4

    path = bench_nf4.run("smoke", tmp_path, torch.device("cpu"))
    import json

    data = json.loads(path.read_text())
    assert {r["group"] for r in data["rows"]} == {"dequant", "decode", "large_t"}
    # the fused decode kernel needs CUDA: on the CPU the row names the fallback that ran
    assert {r["method"] for r in data["rows"] if r["group"] == "decode"} == {
        "datalora_dequant_fallback", "bnb_matmul_4bit+peft_loop"}
    assert all(r["ms"] > 0 for r in data["rows"]) and data["meta"]["torch"] == torch.__version__
    assert data["meta"]["complete"] is True


def test_bench_nf4_runs_only_the_groups_asked_for(tmp_path):
    """The GPU suite leaves the decode group out when the decode kernel failed its check."""
    import json

    from benchmarks import bench_nf4

    path = bench_nf4.run("smoke", tmp_path, torch.device("cpu"), groups=("dequant", "large_t"))
    data = json.loads(path.read_text())
    assert {r["group"] for r in data["rows"]} == {"dequant", "large_t"}
    assert data["meta"]["groups"] == ["dequant", "large_t"]
    with pytest.raises(ValueError, match="groups: expected a subset"):
        bench_nf4.run("smoke", tmp_path, torch.device("cpu"), groups=("gemv",))


def test_get_datalora_model_on_bnb_nf4_quantized_model():
    pytest.importorskip("transformers")
    from datalora.config import DATALORAConfig
    from datalora.model import get_datalora_model
    from datalora.testing import build_tiny_model

    model = build_tiny_model()
    for name, mod in list(model.named_modules()):  # what BitsAndBytesConfig(load_in_4bit) does
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and ".layers." in f".{name}.":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=torch.float32,
                                      quant_type="nf4")
                q.load_state_dict(child.state_dict())
                setattr(mod, child_name, q.to("cpu"))
    ids = torch.randint(0, 100, (2, 12))
    wrapped = get_datalora_model(model, DATALORAConfig(), verbose=False)
    layers = [m for m in wrapped.modules() if isinstance(m, MoLoRALinear)]
    assert layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    wrapped.train()
    out = wrapped(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in layers)
    assert all(not p.requires_grad for m in layers for p in m.base_layer.parameters())


def _has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


needs_bnb_cpu_repack = pytest.mark.skipif(
    not _has_avx512bf16(), reason="bnb repacks CPU 4-bit weights only with AVX512-BF16")


def _bnb_cpu_layer(dq, bias=True):
    torch.manual_seed(0)
    return bnb.nn.Linear4bit(64, 96, bias=bias, compute_dtype=torch.float32,
                             compress_statistics=dq, quant_type="nf4").to("cpu").eval()


@needs_bnb_cpu_repack
@pytest.mark.parametrize("dq", [False, True])
def test_from_bnb_after_cpu_inference_forward(dq):
    """bitsandbytes >= 0.49 repacks a Linear4bit weight in place on its first CPU inference
    forward (AVX512-BF16): from_bnb undoes the tiling instead of misreading it."""
    lin = _bnb_cpu_layer(dq)
    before = nf4_weight(lin)
    ref = before.dequantize(torch.float32).clone()
    with torch.no_grad():
        lin(torch.randn(2, 64))  # bnb repacks the weight in place here
    assert getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    t = nf4_weight(lin)
    assert t.shape == before.shape and t.dtype == before.dtype
    # the nibbles survive; bnb rounded absmax to bf16 (and dropped double quant)
    if not dq:  # the nibbles survive (bnb re-tiles them, we undo it)
        assert torch.equal(t.data, before.data.reshape(-1, 1))
    torch.testing.assert_close(t.dequantize(torch.float32), ref, rtol=1e-2, atol=1e-2)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(NF4Linear.from_bnb(lin)(x), lin(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dq", [False, True])
def test_a_weight_bnb_repacked_for_cpu_is_unpacked_once_per_version(dq):
    """The repack (bitsandbytes' own ``_convert_weight_packed_for_cpu``, which its CPU
    inference forward runs where AVX512-BF16 exists) is undone exactly, up to bnb's bf16
    absmax, and once: a MoLoRA layer over such a base copied it on every forward (7 ms at
    2048 x 2048), silently; an in-place change of the weight is seen."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    lin = _bnb_cpu_layer(dq)
    before = nf4_weight(lin)
    ref = before.dequantize(torch.float32).clone()
    lin.weight.data, lin.weight.quant_state = _convert_weight_packed_for_cpu(
        lin.weight.data, lin.weight.quant_state)
    t = nf4_weight(lin)
    assert t is nf4_weight(lin)  # kept
    assert t.shape == before.shape and t.dtype == before.dtype
    if not dq:
        assert torch.equal(t.data, before.data.reshape(-1, 1))
    torch.testing.assert_close(t.dequantize(torch.float32), ref, rtol=1e-2, atol=1e-2)
    m = MoLoRALinear(lin, num_experts=4, rank=4).eval()
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, t.dequantize(torch.float32), lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)  # B starts at zero
    with torch.no_grad():
        lin.weight.zero_()  # every code 0: -1.0 * absmax (load_state_dict copies in place too)
    changed = nf4_weight(lin)
    assert changed is not t
    assert torch.equal(changed.data, torch.zeros_like(changed.data))
    lin.state_dict()  # bnb undoes the packing: the copy is dropped, not kept alive
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    # and read back (without double quant bnb leaves absmax packed: bf16 [K / 64, N])
    unpacked = nf4_weight(lin).dequantize(torch.float32)
    assert "_datalora_unpacked" not in vars(lin.weight.quant_state)
    torch.testing.assert_close(unpacked, changed.dequantize(torch.float32), rtol=1e-2,
                               atol=1e-3)  # with double quant bnb quantizes absmax again


def test_a_bnb_base_in_another_dtype_compiles_without_graph_breaks():
    """The one-time compute-dtype warning ran inside the traced forward: dynamo cannot trace
    warnings.warn, so every compiled call of such a layer (QLoRA's default fp32 compute
    under a bf16 model) broke its graph twice and fullgraph=True failed."""
    import torch._dynamo

    m = MoLoRALinear(_bnb_cpu_layer(False), num_experts=4, rank=4).to(torch.bfloat16).eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x)  # eager: warns
    with torch.no_grad(), torch._dynamo.config.patch(disable=False):  # off in this module
        explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_weight_bnb_repacked_under_inference_mode_is_read_uncached():
    """Inference tensors have no version counter: keying the cache on it raised
    "Inference tensors do not track version counter" (bnb repacks in place on a CPU
    inference forward, e.g. evaluating the base model under torch.inference_mode first)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    lin = _bnb_cpu_layer(False)
    ref = nf4_weight(lin).dequantize(torch.float32).clone()
    with torch.inference_mode():
        lin.weight.data, lin.weight.quant_state = _convert_weight_packed_for_cpu(
            lin.weight.data, lin.weight.quant_state)
    m = MoLoRALinear(lin, num_experts=4, rank=4).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, ref, lin.bias), rtol=1e-2,
                               atol=1e-2)


def test_a_bnb_base_computing_in_another_dtype_warns_once():
    """bf16 inputs into a Linear4bit with compute_dtype fp32 (BitsAndBytesConfig's default)
    skip the NF4 fast paths, which dequantize to x's dtype: said once per dtype pair (bnb's
    own warning for this never runs, its forward being bypassed); nothing when they agree."""
    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()  # another test of this process may have warned
    m = MoLoRALinear(_bnb_cpu_layer(False), num_experts=4, rank=4)
    x = torch.randn(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # fp32 into fp32
    m.to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="compute_dtype=torch.float32 gets torch.bfloat16.*"
                                            "bnb_4bit_compute_dtype=torch.bfloat16"):
        m(x.bfloat16())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x.bfloat16())  # once


def test_slow_nf4_paths_warn_under_torch_compile_too(monkeypatch):
    """The NF4 layers' one-time warnings were skipped while torch.compile traced, so a
    compiled model was never told: a bnb base computing in another dtype and
    ``DATALORA_NF4_FUSED=1`` off the triton backend now warn from a fullgraph compile."""
    import torch._dynamo

    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()
    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    bnb_layer = MoLoRALinear(_bnb_cpu_layer(False), num_experts=4, rank=4).bfloat16()
    nf4_layer = MoLoRALinear(torch.nn.Linear(64, 32), 4, 4, quantize="nf4").eval()
    with (pytest.warns(RuntimeWarning) as caught, torch.no_grad(),
          torch._dynamo.config.patch(disable=False)):  # off in this module
        torch.compile(bnb_layer, backend="eager", fullgraph=True)(torch.randn(3, 64).bfloat16())
        torch.compile(nf4_layer, backend="eager", fullgraph=True)(torch.randn(3, 64))
    said = "\n".join(str(w.message) for w in caught)
    assert "compute_dtype=torch.float32 gets torch.bfloat16" in said
    assert "DATALORA_NF4_FUSED=1 has no effect off the triton backend" in said
    _warn_once.cache_clear()


@needs_bnb_cpu_repack
@pytest.mark.parametrize("dq", [False, True])
def test_molora_over_bnb_base_eval_second_call(dq):
    m = MoLoRALinear(_bnb_cpu_layer(dq), num_experts=4, rank=4).eval()
    x = torch.randn(2, 64)
    y1 = m(x)  # LoRA params require grad -> base(x) path -> bnb repacks
    y2 = m(x)  # used to raise "absmax: expected float32, got torch.bfloat16"
    torch.testing.assert_close(y2, y1, rtol=1e-2, atol=1e-2)


def test_double_cast_keeps_nf4linear_usable():
    m = NF4Linear.from_linear(torch.nn.Linear(64, 32), 64)
    m.double()
    assert m.compute_dtype in nf4.FLOAT_DTYPES
    assert m.weight.dtype == torch.float32  # raised: dtype ... got torch.float64
    assert m.dequantize().dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.float64)  # fp64 input: the same weights, in fp64
    want = x @ nf4.dequantize(m.weight, torch.float32).double().T + m.bias
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    layer = MoLoRALinear(torch.nn.Linear(64, 32), 4, 4, quantize="nf4").double()
    assert layer(x).dtype == torch.float64


def test_dequantize_reuses_one_code_table_per_device(monkeypatch):
    """A host-to-device copy of the code table per call would sync the stream once per NF4
    layer per forward on a GPU."""
    cpu = torch.device("cpu")
    assert nf4.code_table(cpu) is nf4.code_table(cpu)
    assert torch.equal(nf4.code_table(cpu), nf4.NF4_CODE)
    assert nf4.pair_table(cpu) is nf4.pair_table(cpu)
    for byte in (0x00, 0x0F, 0xF0, 0x7A, 0xFF):  # high nibble first
        assert nf4.pair_table(cpu)[byte].tolist() == [nf4.NF4_CODE[byte >> 4].item(),
                                                      nf4.NF4_CODE[byte & 0xF].item()]
    t = nf4.quantize(torch.randn(8, 64), 64)
    moved = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if self is nf4.NF4_CODE or self is nf4.NF4_PAIRS:
            moved.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    nf4.dequantize_torch(t, torch.float32)
    assert moved == []


def test_nf4_training_compiles_before_any_eager_call(monkeypatch):
    """The first dequantize of a process, inside ``NF4Linear``'s autograd.Function under
    ``torch.compile``, cached its code table from within the traced subgraph: dynamo
    refused it ("an intermediate tensor ... aliases an input or output")."""
    import torch._dynamo

    monkeypatch.setattr(nf4, "_TABLES", {})
    q = NF4Linear.from_linear(_linear(64, 32))
    cpu = torch.device("cpu")
    assert set(nf4._TABLES) == {("code", cpu), ("pairs", cpu)}  # built with the layer
    monkeypatch.setattr(nf4, "_TABLES", {})  # as on a device it was never built on
    x = torch.randn(3, 64, requires_grad=True)
    with torch._dynamo.config.patch(disable=False):  # off in this module
        y = torch.compile(q, backend="aot_eager")(x)
        y.sum().backward()
    assert nf4._TABLES == {}  # built in the graph, not kept
    w = q.dequantize()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, q.bias))
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ w)


@pytest.mark.parametrize("bias", [False, True])
def test_bnb_base_after_an_inference_forward_trains_correctly(bias):
    """bitsandbytes repacks a Linear4bit in place on its first CPU inference forward (0.49+,
    AVX512-BF16 CPUs), and its packed path has no autograd: MoLoRALinear computes the base
    itself, so gradients equal those over the same weight in an NF4Linear (and a bias
    does not crash); a disabled adapter does not trigger the repack either."""
    def bnb_layer():
        torch.manual_seed(0)
        return bnb.nn.Linear4bit(64, 96, bias=bias, compute_dtype=torch.float32,
                                 quant_type="nf4").to("cpu")

    def grads(base):
        torch.manual_seed(0)
        layer = MoLoRALinear(base, num_experts=4, rank=4).train()
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.lora_A.grad

    base = bnb_layer()
    with torch.no_grad():
        base.eval()(torch.randn(2, 64))  # may repack (CPU features; absmax rounded to bf16)
    want = grads(NF4Linear.from_bnb(base))  # the same 4-bit weight, as datalora decodes it
    for got, ref in zip(grads(base), want, strict=True):
        torch.testing.assert_close(got, ref)

    fresh = bnb_layer()
    layer = MoLoRALinear(fresh, num_experts=4, rank=4).eval()
    layer.adapter_enabled = False
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), NF4Linear.from_bnb(bnb_layer())(x))
    assert not getattr(fresh.weight.quant_state, "packing_format_for_cpu", False)


def test_double_quant_of_tiny_and_non_finite_weights():
    """A subnormal absmax spread (1/spread overflows fp32) still encodes; NaN / inf weights
    are refused with an error naming w (double quant cannot encode them)."""
    w = _weight((8, 256), torch.float32)
    tiny = nf4.dequantize(nf4.quantize(w * 1e-40, 64, double_quant=True))
    assert torch.isfinite(tiny).all()
    ref = nf4.dequantize(nf4.quantize(w * 1e-40, 64))  # single quant: no nested scales
    assert (tiny - ref).abs().max() <= 0.02 * ref.abs().max()
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[1, 3] = bad
        for double_quant in (True, False):  # single quant NaN-ed the block, silently
            with pytest.raises(ValueError, match="w: has NaN or inf values, which NF4 cannot"):
                nf4.quantize(w2, 64, double_quant=double_quant)


def test_double_quant_refuses_block_scales_whose_mean_overflows():
    """Finite but huge weights: the absmax mean overflowed to inf and the nested codes'
    index went negative (an IndexError deep inside)."""
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)) * 1e35
    with pytest.raises(ValueError, match=r"w: its block scales \(up to .*\) overflow fp32"):
        nf4.quantize(w, 64, double_quant=True)
    assert torch.isfinite(nf4.dequantize(nf4.quantize(w, 64), torch.float32)).all()


def test_bnb_linear4bit_with_bf16_quant_storage():
    """``quant_storage=torch.bfloat16`` (FSDP-QLoRA) holds the same bytes: read as uint8."""
    def layer(storage):
        torch.manual_seed(0)
        return bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4",
                                 quant_storage=storage).to("cpu")

    ref, odd = layer(torch.uint8), layer(torch.bfloat16)
    assert odd.weight.dtype == torch.bfloat16
    w = nf4.dequantize(nf4.NF4Tensor.from_bnb(odd.weight), None)  # its fp32
    assert torch.equal(w, nf4.dequantize(nf4.NF4Tensor.from_bnb(ref.weight), None))
    x = torch.randn(3, 64)
    torch.testing.assert_close(MoLoRALinear(odd, 4, 4)(x), x @ w.T + odd.bias)


def test_nf4_api_errors_name_what_the_user_passed():
    import numpy as np

    from datalora.nf4_linear import quantize_linear

    t = nf4.quantize(torch.randn(8, 64), np.int64(64))  # a numpy blocksize is a blocksize
    assert t.blocksize == 64 and type(t.blocksize) is int
    with pytest.raises(TypeError, match="NF4Tensor.to takes a device, got dtype"):
        t.to(torch.float16)
    with pytest.raises(ValueError, match="^device: expected a torch.device or a device name "
                                         "such as 'cuda:0', got 'gpu0'"):
        t.to("gpu0")  # torch's "Invalid device string" named no argument
    assert t.to("cpu").data is t.data
    with pytest.raises(ValueError, match="quantize: expected 'nf4', got None"):
        quantize_linear(torch.nn.Linear(64, 8), None)
    with pytest.raises(ValueError, match="base_layer: cannot be quantized to NF4"):
        MoLoRALinear(torch.nn.Linear(64, 8).double(), 4, 4, quantize="nf4")


def test_nf4_linear_errors_name_the_bad_argument():
    """A plain tensor or 1-D weight, a 0-d / non-tensor x and a wrong-shaped bias were
    reported as ``t:`` / ``x:`` or surfaced as IndexError / AttributeError / RuntimeError."""
    from datalora.nf4_linear import nf4_linear

    t = nf4.quantize(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="weight: expected an NF4Tensor, got Tensor"):
        nf4_linear(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"weight: expected shape \[d_out, d_in\], got \(64,\)"):
        nf4_linear(x, nf4.quantize(torch.randn(64)))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        nf4_linear(torch.tensor(1.0), t)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        nf4_linear([1.0] * 64, t)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(9,\)"):
        nf4_linear(x, t, torch.zeros(9))
    with pytest.raises(ValueError, match="x: expected a floating dtype, got torch.int64"):
        nf4_linear(torch.ones(2, 64, dtype=torch.long), t)
    assert nf4_linear(x, t, torch.zeros(8)).shape == (2, 8)


def test_nf4_linear_module_errors_name_the_bad_argument():
    """``NF4Linear(weight, bias)`` and ``NF4Linear.from_linear`` refuse what they cannot
    hold, by argument: a plain tensor or 1-D weight, a non-tensor, integer or wrong-shaped
    bias, a module that is not a float ``nn.Linear``."""
    from datalora.nf4_linear import NF4Linear

    t = nf4.quantize(torch.randn(8, 64))
    cases = [((torch.randn(8, 64),), TypeError, "weight: expected an NF4Tensor, got Tensor"),
             ((nf4.quantize(torch.randn(64)),), ValueError,
              r"weight: expected shape \[d_out, d_in\], got \(64,\)"),
             ((t, [0.0] * 8), TypeError, "bias: expected a torch.Tensor or None, got list"),
             ((t, torch.zeros(8, dtype=torch.long)), ValueError,
              "bias: expected a floating dtype, got torch.int64"),
             ((t, torch.zeros(9)), ValueError, r"bias: expected shape \(8,\), got \(9,\)")]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            NF4Linear(*args)
    with pytest.raises(TypeError, match="linear: expected a float nn.Linear, got Conv1d"):
        NF4Linear.from_linear(torch.nn.Conv1d(64, 8, 1))
    layer = NF4Linear(t, torch.zeros(8))
    assert (layer.in_features, layer.out_features) == (64, 8)
    assert not layer.bias.requires_grad


def test_nf4_linear_gradients_match_the_dense_linear():
    """x's and a trainable bias's gradients (a bnb Linear4bit base's bias trains unless
    frozen) equal those of F.linear over the dequantized weight, for x [B, T, d_in]; an x
    of another width is refused by name."""
    from datalora.nf4_linear import nf4_linear

    torch.manual_seed(0)
    t = nf4.quantize(torch.randn(8, 64))
    w = nf4.dequantize(t, torch.float32)
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    g = torch.randn(2, 3, 8)
    got = torch.autograd.grad(nf4_linear(x, t, bias), (x, bias), g)
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, bias), (x, bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        nf4_linear(torch.randn(2, 63), t)

@pytest.mark.filterwarnings("ignore:datalora. a bnb Linear4bit base:RuntimeWarning")
def test_nf4_molora_linear_reads_lora_x_and_the_bnb_compute_dtype():
    """Without a gradient (the molora_linear path) the LoRA part reads lora_x (x after
    dropout), not x; a bnb Linear4bit base computes in its compute_dtype (x cast in, the
    result cast back, as bitsandbytes does), with or without the LoRA part."""
    from datalora.nf4_linear import nf4_base_forward, nf4_molora_linear

    torch.manual_seed(1)
    E, r, k, T = 3, 4, 2, 5
    x, lx = torch.randn(T, 64), torch.randn(T, 64)
    A, B = torch.randn(E, r, 64) * 0.1, torch.randn(E, 16, r) * 0.1
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    gates = torch.rand(T, k)
    base = NF4Linear.from_linear(_linear(64, 16))
    with torch.no_grad():
        got = nf4_molora_linear(base, x, lx, A, B, ids, gates, scaling=2.0)
    want = base(x) + molora_delta_reference(lx, A, B, ids, gates, None, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    q = bnb.nn.Linear4bit(64, 16, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.load_state_dict(_linear(64, 16).state_dict())
    q = q.to("cpu")  # quantizes
    w = nf4.dequantize(nf4.NF4Tensor.from_bnb(q.weight), torch.bfloat16)
    base_out = torch.nn.functional.linear(x.bfloat16(), w, q.bias.bfloat16()).float()
    assert torch.equal(nf4_base_forward(q, x), base_out)
    with torch.no_grad():
        got = nf4_molora_linear(q, x, x, A, B, ids, gates, scaling=2.0)
    want = base_out + molora_delta_reference(x, A, B, ids, gates, None, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:datalora. a bnb Linear4bit base:RuntimeWarning")
def test_the_fused_gpu_paths_keep_a_bnb_bases_compute_dtype(monkeypatch):
    """The CUDA decode and Triton fused kernels dequantize W to x's dtype: for a bnb base
    whose compute_dtype is another (fp32 with bf16 activations) they ran the base in bf16,
    where every other path computes it in fp32 as bitsandbytes does."""
    import datalora.nf4_linear as nl

    def never(*args, **kwargs):
        raise AssertionError("a fused kernel took a base of another compute dtype")

    monkeypatch.setattr(nl, "_fused_decode_ok", lambda *args: True)
    monkeypatch.setattr(nl, "_triton_fused_ok", lambda *args: True)
    monkeypatch.setattr(nl, "_nf4_molora_decode_op", never)
    monkeypatch.setattr(nl, "_triton_fused", never)
    q = bnb.nn.Linear4bit(64, 16, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(_linear(64, 16).state_dict())
    q = q.to("cpu")
    x = torch.randn(2, 64).bfloat16()
    A, B = torch.randn(3, 4, 64).bfloat16() * 0.1, torch.randn(3, 16, 4).bfloat16() * 0.1
    ids, gates = torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2).bfloat16()
    with torch.no_grad():
        got = nl.nf4_molora_linear(q, x, x, A, B, ids, gates, scaling=2.0)
    want = nl.nf4_base_forward(q, x) + molora_delta_reference(x, A, B, ids, gates, None, 2.0)
    torch.testing.assert_close(got, want.to(got.dtype))
    fused = []  # an NF4Linear computes in x's dtype: the fused path is its own
    monkeypatch.setattr(nl, "_nf4_molora_decode_op",
                        lambda *a: fused.append(1) or torch.zeros(2, 16))
    with torch.no_grad():
        nl.nf4_molora_linear(NF4Linear.from_linear(_linear(64, 16)).bfloat16(), x, x, A, B,
                             ids, gates, scaling=2.0)
    assert fused == [1]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_a_bnb_base_without_compute_dtype_computes_in_x_dtype(x_dtype):
    """bitsandbytes' Linear4bit(compute_dtype=None) computes in its input's dtype (it adopts
    that of its first fp32 / bf16 input); datalora computed such a base in the weight's
    original dtype (fp32 for bf16 activations) and so never took the x-dtype paths."""
    from datalora.nf4_linear import _computes_in_x_dtype, nf4_base_forward

    q = bnb.nn.Linear4bit(64, 16, bias=True, quant_type="nf4")  # compute_dtype None
    q.load_state_dict(_linear(64, 16).state_dict())
    q = q.to("cpu").train()  # quantizes; train(): bnb's own forward keeps its layout
    x = torch.randn(3, 64, dtype=x_dtype)
    assert q.compute_dtype is None and _computes_in_x_dtype(q, x)
    w = nf4.dequantize(nf4.NF4Tensor.from_bnb(q.weight), x_dtype)
    got = nf4_base_forward(q, x)
    assert torch.equal(got, torch.nn.functional.linear(x, w, q.bias.to(x_dtype)))
    assert torch.equal(got, q(x))  # bitsandbytes itself (now compute_dtype = x_dtype)
    assert q.compute_dtype == x_dtype


def test_quantizing_a_bad_layer_names_the_callers_argument():
    """``NF4Linear.from_linear`` on an fp64 linear said ``w:`` (nf4.quantize's name) and
    ``MoLoRALinear(conv, quantize="nf4")`` said ``linear:`` (from_linear's name)."""
    with pytest.raises(ValueError, match="linear.weight: expected dtype in"):
        NF4Linear.from_linear(torch.nn.Linear(64, 8).double())
    with pytest.raises(TypeError, match="base_layer: expected an nn.Linear to quantize"):
        MoLoRALinear(torch.nn.Conv1d(3, 3, 1), 2, 2, top_k=1, quantize="nf4")
    with pytest.raises(ValueError, match=r"base_layer: cannot be quantized to NF4 "
                                         r"\(base_layer.weight: expected dtype"):
        MoLoRALinear(torch.nn.Linear(64, 8).double(), 2, 2, top_k=1, quantize="nf4")


def test_from_bnb_rejects_a_pair_without_a_quant_state():
    data, _ = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    for state in ("nf4", {"quant_type": "nf4"}):  # was AttributeError: no .quant_type
        with pytest.raises(TypeError, match="param: expected a .data, QuantState. pair, got "
                                            "a quant_state of type"):
            nf4.NF4Tensor.from_bnb((data, state))


def test_double_quant_of_a_meta_weight():
    """A model skeleton on the meta device quantizes (double quant tried ``.item()`` on the
    meta absmax: RuntimeError); its weights are loaded into it afterwards."""
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 32)
    q = NF4Linear.from_linear(lin, 64, double_quant=True)
    assert q.weight.device.type == "meta" and q.weight.double_quant
    ref = NF4Linear.from_linear(_linear(64, 32), 64, double_quant=True)
    q.to_empty(device="cpu")
    q.load_state_dict(ref.state_dict())
    assert torch.equal(q.dequantize(), ref.dequantize())


def test_nf4linear_rejects_a_bias_that_is_not_a_float_tensor():
    t = nf4.quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
        NF4Linear(t, [0.0] * 8)  # was AttributeError: 'list' object has no attribute 'shape'
    with pytest.raises(ValueError, match="bias: expected a floating dtype, got torch.int64"):
        NF4Linear(t, torch.zeros(8, dtype=torch.long))  # was accepted, cast on every forward


def test_nf4tensor_names_a_field_of_the_wrong_type():
    t = nf4.quantize(torch.randn(10, 64), 64, double_quant=True)
    with pytest.raises(TypeError, match="data: expected a torch.Tensor, got list"):
        nf4.NF4Tensor([1], t.absmax, t.shape, t.dtype, 64)  # was AttributeError
    with pytest.raises(TypeError, match="absmax: expected a torch.Tensor, got NoneType"):
        nf4.NF4Tensor(t.data, None, t.shape, t.dtype, 64)
    for shape in (None, "abc", (10.0, 64)):  # torch.Size's error named no field
        with pytest.raises(TypeError, match="^shape: expected a sequence of ints, got "):
            nf4.NF4Tensor(t.data, t.absmax, shape, t.dtype, 64)
    with pytest.raises(ValueError, match="offset: expected one value, got 2"):
        nf4.NF4Tensor(t.data, t.absmax, t.shape, t.dtype, 64, t.nested_absmax, t.nested_code,
                      t.offset.repeat(2))  # was accepted, broadcast in absmax_float


def test_nf4linear_state_dict_saves_as_safetensors(tmp_path):
    """The extra state (shape, dtype, blocksize) was a dict, which safetensors refuses: a
    model holding an NF4Linear could not be saved by ``save_pretrained`` / ``save_file``."""
    from safetensors.torch import load_file, save_file

    q = NF4Linear.from_linear(_linear(64, 24, dtype=torch.bfloat16), blocksize=32)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    q2 = NF4Linear(nf4.quantize(torch.zeros(24, 64), 32), torch.zeros(24))
    q2.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert q2.compute_dtype == torch.bfloat16 and q2.weight.blocksize == 32
    assert torch.equal(q2.dequantize(), q.dequantize())
    # a state dict saved with the former dict extra state still loads
    old = dict(q.state_dict(), _extra_state={"shape": [24, 64], "dtype": "float16",
                                             "blocksize": 32})
    q2.load_state_dict(old)
    assert q2.compute_dtype == torch.float16 and q2.weight.blocksize == 32
    # a damaged or hostile extra state (it comes from a file) is refused, not read as bf16
    for bad in (torch.tensor([24, 64, 32, -1]), torch.tensor([24, 64, 32, 3]),
                torch.tensor([24, 64, 33, 0]), torch.tensor([0, 64, 32, 0]),
                torch.tensor([24.0, 64.0, 32.0, 0.0]),
                {"shape": [24, 64], "dtype": "load", "blocksize": 32}):
        with pytest.raises(ValueError, match="state: not the extra state of an NF4Linear"):
            q2.set_extra_state(bad)
    assert q2.compute_dtype == torch.float16


def test_double_quant_tensors_own_their_storage(tmp_path):
    """The uint8 absmax was a view of the 256-padded codes (safetensors' save_model refused
    it) and nested_code was the cached dynamic map itself: writing one layer's buffer in
    place (load_state_dict, an init) changed every later quantization."""
    from safetensors.torch import load_model, save_model

    t = nf4.quantize(torch.randn(8, 64), 64, double_quant=True)
    assert t.absmax.untyped_storage().nbytes() == t.absmax.numel()
    q = NF4Linear(t)
    save_model(q, str(tmp_path / "q.safetensors"))
    q2 = NF4Linear(nf4.quantize(torch.zeros(8, 64), 64, double_quant=True))
    load_model(q2, str(tmp_path / "q.safetensors"))
    assert torch.equal(q2.dequantize(), q.dequantize())
    q2.weight_nested_code.zero_()
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())
    assert torch.equal(nf4.quantize(torch.randn(8, 64), 64, True).nested_code,
                       F.create_dynamic_map())
    t.quant_state().code.zero_()
    assert nf4.NF4_CODE[0] == -1.0


@pytest.mark.parametrize("shape, blocksize, bias", [((70, 100), 64, True), ((45, 96), 128, False),
                                                    ((33, 130), 64, True)])
def test_a_large_fp32_nf4_layer_multiplies_a_chunk_of_rows_at_a_time(shape, blocksize, bias,
                                                                     monkeypatch):
    """On the CPU an fp32 weight over ``CPU_CHUNK`` values is decoded and multiplied a
    block-aligned chunk of rows at a time, forward and backward (a short last chunk
    included): the whole weight's values, no whole fp32 copy."""
    d_out, d_in = shape
    q = NF4Linear.from_linear(_linear(d_in, d_out, bias), blocksize, True)
    monkeypatch.setattr(nf4, "CPU_CHUNK", 2 * blocksize)
    with torch.enable_grad():  # recording autograd: the whole-weight path
        assert nf4.cpu_row_chunk(q.weight, torch.float32) is None
    with torch.no_grad():
        rows = nf4.cpu_row_chunk(q.weight, torch.float32)
        assert rows < d_out and rows * d_in % blocksize == 0
        assert nf4.cpu_row_chunk(q.weight, torch.bfloat16) is None
    chunked = []
    for name in ("linear_in_chunks", "grad_input_in_chunks"):
        original = getattr(nf4, name)
        monkeypatch.setattr(nf4, name, lambda *a, _f=original, _n=name: chunked.append(_n)
                            or _f(*a))
    x = torch.randn(2, 5, d_in, requires_grad=True)
    y = q(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert chunked == ["linear_in_chunks", "grad_input_in_chunks"]
    weight = nf4.dequantize(q.weight, torch.float32)
    x_ref = x.detach().clone().requires_grad_()
    want = torch.nn.functional.linear(x_ref, weight, q.bias)
    want.backward(grad)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # a differentiable backward (create_graph) records autograd: the whole weight
    x2 = torch.randn(3, d_in, requires_grad=True)
    (g,) = torch.autograd.grad(q(x2).pow(2).sum(), x2, create_graph=True)
    g.sum().backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
