"""The compiled CEP ops (models._C) against their pure-PyTorch twins: values, gradients, gradcheck, opcheck, compile.

Tolerances follow flash-attention's rule: the kernel's fp32 error against an fp64 reference may be at most a small
multiple of PyTorch's own fp32 error (the twin run in fp32) against the same reference."""
import pytest
import torch

from models import cep

pytestmark = pytest.mark.skipif(not cep.HAS_EXTENSION, reason="models._C is not built (run `make install`)")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def attention_inputs(batch=2, heads=2, queries=5, tokens=7, head_dim=8, channels=12, dtype=torch.float32,
                     device="cpu", masked=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    q = randn(batch, heads, queries, head_dim)
    context = randn(batch, tokens, channels)
    w_k = randn(heads * head_dim, channels, scale=channels**-0.5)
    w_v = randn(heads * head_dim, channels, scale=channels**-0.5)
    key_mask = None
    if masked:
        key_mask = (torch.rand(batch, tokens, generator=generator) > 0.3).to(device)
        key_mask[:, 0] = True
        key_mask[-1] = False  # one fully masked batch element: defined as output 0, zero gradients
    return q, context, w_k, w_v, key_mask


def outputs_and_grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs[:4]]
    out = fn(*leaves, inputs[4])
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_within_pytorch_error(kernel, twin, reference, factor, floor=1e-6):
    for name, got, base, ref in zip(("out", "grad_q", "grad_context", "grad_w_k", "grad_w_v"), kernel, twin,
                                    reference):
        kernel_error = (got.double() - ref).abs().max().item()
        twin_error = (base.double() - ref).abs().max().item()
        assert kernel_error <= factor * twin_error + floor, f"{name}: {kernel_error} vs PyTorch {twin_error}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("queries, tokens", [(1, 1), (113, 77), (239, 1), (239, 77), (600, 300)])
def test_cross_attention_matches_twin(device, masked, queries, tokens):
    inputs = attention_inputs(queries=queries, tokens=tokens, device=device, masked=masked, seed=queries + tokens)
    stream = dict(gamma=1.0, mode="uniform", seed=5, offset=3)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)

    def kernel(*args):
        return cep.cross_attention(*args, **stream)

    def twin(*args):
        return cep.cross_attention_reference(*args, **stream)

    reference = outputs_and_grads(twin, [t.double() for t in inputs[:4]] + [inputs[4]], grad_out.double())
    assert_within_pytorch_error(outputs_and_grads(kernel, inputs, grad_out), outputs_and_grads(twin, inputs, grad_out),
                                reference, factor=3)
    if masked:  # the fully masked batch element: output and every gradient flowing from it are zero
        out, grad_q, grad_context = outputs_and_grads(kernel, inputs, grad_out)[:3]
        assert not out[-1].any() and not grad_q[-1].any() and not grad_context[-1].any()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_bf16_accumulates_in_fp32(device):
    inputs = attention_inputs(queries=64, tokens=77, device=device, masked=True)
    reference = cep.cross_attention_reference(*[t.double() for t in inputs[:4]], inputs[4], gamma=1.0, seed=2)
    half = [t.bfloat16() for t in inputs[:4]]
    out = cep.cross_attention(*half, inputs[4], gamma=1.0, seed=2)
    twin = cep.cross_attention_reference(*half, inputs[4], gamma=1.0, seed=2)
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference).abs().max() <= 2 * (twin.double() - reference).abs().max() + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_stream_is_bit_identical_to_twin(device):
    x = torch.zeros(3, 5, 64, device=device)
    # gamma = sqrt(dim) makes out = noise exactly; the last offset crosses a 2^32 boundary of the Philox counter
    for offset in (0, 1, 7, 4 * 2**32 - 37):
        out = cep.perturb(x, gamma=8.0, mode="uniform", seed=123456789012, offset=offset)
        twin = cep.perturb_reference(x.cpu(), gamma=8.0, mode="uniform", seed=123456789012, offset=offset)
        assert torch.equal(out.cpu(), twin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", cep.MODES)
def test_perturb_matches_twin(device, dtype, mode):
    x = torch.randn(4, 33, 17, dtype=torch.float64).to(device, dtype)
    out = cep.perturb(x, gamma=1.5, mode=mode, seed=9, offset=11, dim=17 * 33)
    twin = cep.perturb_reference(x.cpu(), gamma=1.5, mode=mode, seed=9, offset=11, dim=17 * 33)
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out.cpu(), twin, rtol=tolerance, atol=tolerance)
    assert out.dtype == dtype


def test_perturb_gradient_is_identity_and_noncontiguous_input_uses_logical_order():
    x = torch.randn(6, 10).t().requires_grad_()  # non-contiguous [10, 6]
    out = cep.perturb(x, gamma=1.0, seed=4)
    torch.testing.assert_close(out, cep.perturb(x.contiguous(), gamma=1.0, seed=4), rtol=0, atol=0)
    out.backward(torch.full_like(out, 2.0))
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_cross_attention_gamma_zero_is_plain_attention_and_matches_sdpa():
    q, context, w_k, w_v, _ = attention_inputs(queries=31, tokens=9)
    out = cep.cross_attention(q, context, w_k, w_v)
    k = (context @ w_k.T).view(2, 9, 2, 8).transpose(1, 2)
    v = (context @ w_v.T).view(2, 9, 2, 8).transpose(1, 2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    q, context, w_k, w_v, key_mask = attention_inputs(batch=2, heads=2, queries=5, tokens=3, head_dim=4, channels=6,
                                                      dtype=torch.float64, masked=True)
    leaves = [t.requires_grad_() for t in (q, context, w_k, w_v)]
    assert torch.autograd.gradcheck(
        lambda *a: cep.cross_attention(*a, key_mask, gamma=0.7, mode="gaussian", seed=3), leaves)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cep.perturb(t, 0.5, "uniform", 1), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.cep.perturb.default, (x, 1.0, "gaussian", 7, 2, 8))
    q, context, w_k, w_v, key_mask = attention_inputs(device=device, masked=True)
    for requires_grad in (False, True):
        leaves = [t.clone().requires_grad_(requires_grad) for t in (q, context, w_k, w_v)]
        torch.library.opcheck(torch.ops.cep.cross_attention.default,
                              (*leaves, key_mask, 1.0, "uniform", 3, 0, context.shape[-1]))
    out, lse = torch.ops.cep.cross_attention(q, context, w_k, w_v, key_mask, 1.0, "uniform", 3, 0, 12)
    torch.library.opcheck(torch.ops.cep.cross_attention_backward.default,
                          (torch.randn_like(out), q, context, w_k, w_v, key_mask, out, lse, 1.0, "uniform", 3, 0, 12))


class CrossAttentionBlock(torch.nn.Module):
    """A module using both ops the way the models do: CEP on the context, then fused cross-attention."""

    def __init__(self, heads=2, head_dim=8, channels=12):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = torch.nn.Linear(channels, heads * head_dim)
        self.to_k = torch.nn.Linear(channels, heads * head_dim, bias=False)
        self.to_v = torch.nn.Linear(channels, heads * head_dim, bias=False)

    def forward(self, x, context, key_mask):
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        context = cep.perturb(context, 0.5, "gaussian", seed=11, offset=0)
        out = cep.cross_attention(q, context, self.to_k.weight, self.to_v.weight, key_mask, gamma=1.0, seed=12)
        return out.transpose(1, 2).reshape(b, n, -1)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    block = CrossAttentionBlock()
    x, context = torch.randn(2, 10, 12), torch.randn(2, 7, 12)
    key_mask = torch.rand(2, 7) > 0.2
    key_mask[:, 0] = True
    compiled = torch.compile(block, fullgraph=True)
    expected = block(x, context, key_mask)
    got = compiled(x, context, key_mask)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), list(block.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_fallback_twin_warns_once(monkeypatch):
    monkeypatch.setattr(cep, "HAS_EXTENSION", False)
    monkeypatch.setattr(cep, "_warned_fallback", False)
    x = torch.zeros(2, 4)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        twin = cep.perturb(x, 2.0, seed=1)
    assert torch.equal(twin, cep.perturb_reference(x, 2.0, seed=1))
    monkeypatch.setattr(cep, "HAS_EXTENSION", True)
    assert torch.equal(cep.perturb(x, 2.0, seed=1), twin)


def test_meta_tensors_use_the_fake_kernels(recwarn):
    q, context, w_k, w_v, key_mask = (None if t is None else t.to("meta") for t in attention_inputs(masked=True))
    out = cep.cross_attention(q, context, w_k, w_v, key_mask, gamma=1.0, seed=1)
    noisy = cep.perturb(context, 1.0, "gaussian", seed=2)
    assert out.device.type == "meta" and out.shape == q.shape and noisy.shape == context.shape
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no fallback to the twins
