"""Hypothesis fuzzing of the CEP ops: random shapes, dtypes, devices and strides agree with the twins; every bad
argument raises a ValueError/TypeError (RuntimeError for schema-level type mismatches of the raw op) that names it."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import cep

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# fp64 inputs get fp32 noise (the gaussian one is only equal to float rounding across implementations)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5, torch.float64: 2e-6}


def maybe_noncontiguous(t, transpose):
    """The same values, stored transposed (so the kernels must handle strides)."""
    if not transpose or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@FUZZ
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), dtype=st.sampled_from(list(TOLERANCE)),
       mode=st.sampled_from(cep.MODES), gamma=st.floats(0, 10), seed=st.integers(0, 2**63 - 1),
       offset=st.integers(0, 2**40), transpose=st.booleans(), device=st.sampled_from(DEVICES))
def test_perturb_fuzz_matches_twin(shape, dtype, mode, gamma, seed, offset, transpose, device):
    x = maybe_noncontiguous(torch.randn(shape, dtype=torch.float64).to(device, dtype), transpose)
    dim = max(1, shape[-1])
    out = cep.perturb(x, gamma, mode, seed, offset, dim)
    twin = cep.perturb_reference(x.cpu(), gamma, mode, seed, offset, dim)
    assert out.shape == x.shape and out.dtype == dtype
    tol = TOLERANCE[dtype] * (1 + gamma)
    torch.testing.assert_close(out.cpu(), twin, rtol=tol, atol=tol)


@FUZZ
@given(batch=st.integers(0, 3), heads=st.integers(1, 3), queries=st.integers(0, 40), tokens=st.integers(1, 20),
       head_dim=st.integers(1, 9), channels=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.float64]),
       use_mask=st.booleans(), gamma=st.floats(0, 3), mode=st.sampled_from(cep.MODES), transpose=st.booleans(),
       data=st.data(), device=st.sampled_from(DEVICES))
def test_cross_attention_fuzz_matches_twin(batch, heads, queries, tokens, head_dim, channels, dtype, use_mask, gamma,
                                           mode, transpose, data, device):
    seed = data.draw(st.integers(0, 2**31))
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=generator, dtype=dtype)
    context = torch.randn(batch, tokens, channels, generator=generator, dtype=dtype)
    w_k = torch.randn(heads * head_dim, channels, generator=generator, dtype=dtype)
    w_v = torch.randn(heads * head_dim, channels, generator=generator, dtype=dtype)
    key_mask = torch.rand(batch, tokens, generator=generator) > 0.5 if use_mask else None
    args = [maybe_noncontiguous(t.to(device), transpose) for t in (q, context, w_k, w_v)]
    key_mask = key_mask.to(device) if use_mask else None
    out = cep.cross_attention(*args, key_mask, gamma=gamma, mode=mode, seed=seed)
    twin = cep.cross_attention_reference(*[t.double().cpu() for t in args], None if key_mask is None else key_mask.cpu(),
                                         gamma=gamma, mode=mode, seed=seed)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    tol = (1e-4 if dtype == torch.float32 else 1e-5) * (1 + gamma)  # fp64 still gets fp32 noise
    torch.testing.assert_close(out.cpu().double(), twin, rtol=tol, atol=tol)


def valid_attention_args():
    return dict(q=torch.randn(2, 2, 3, 4), context=torch.randn(2, 5, 6), w_k=torch.randn(8, 6),
                w_v=torch.randn(8, 6), key_mask=torch.ones(2, 5, dtype=torch.bool), gamma=1.0, mode="uniform",
                seed=0, offset=0, dim=6)


# (argument, bad value): each must raise an error that names the argument, in the wrapper and in the raw C++ op.
BAD_ATTENTION_ARGS = [
    ("q", torch.randn(2, 3, 4)), ("q", torch.randn(3, 2, 3, 4)), ("q", torch.randint(0, 3, (2, 2, 3, 4))),
    ("q", torch.randn(2, 2, 3, 4, dtype=torch.float64)), ("q", "tensor"),
    ("context", torch.randn(2, 5)), ("context", torch.randn(2, 0, 6)), ("context", torch.randn(3, 5, 6)),
    ("w_k", torch.randn(8, 5)), ("w_k", torch.randn(9, 6)), ("w_v", torch.randn(8)), ("w_v", torch.randn(8, 6).half()),
    ("key_mask", torch.ones(2, 5)), ("key_mask", torch.ones(2, 4, dtype=torch.bool)),
    ("gamma", -0.5), ("gamma", float("inf")), ("gamma", float("nan")), ("gamma", "big"),
    ("mode", "laplace"), ("mode", 1), ("seed", -3), ("seed", 2.5), ("offset", -1), ("offset", 2**63 - 2),
    ("dim", 0), ("dim", -4),
]


@pytest.mark.parametrize("name, value", BAD_ATTENTION_ARGS, ids=[f"{n}-{i}" for i, (n, _) in
                                                                  enumerate(BAD_ATTENTION_ARGS)])
@pytest.mark.parametrize("entry", ["wrapper", "raw_op"])
def test_bad_attention_argument_is_named(name, value, entry):
    kwargs = valid_attention_args()
    kwargs[name] = value
    if entry == "wrapper":
        with pytest.raises((ValueError, TypeError), match=name):
            cep.cross_attention(**kwargs)
    else:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            torch.ops.cep.cross_attention(*kwargs.values())


BAD_PERTURB_ARGS = [("x", [1.0, 2.0]), ("x", torch.ones(3, dtype=torch.int64)), ("x", torch.tensor(1.0)),
                    ("gamma", -1.0), ("gamma", None), ("mode", "normal"), ("seed", -1), ("seed", 2**64),
                    ("offset", -7), ("dim", 0), ("dim", 1.5)]


@pytest.mark.parametrize("name, value", BAD_PERTURB_ARGS, ids=[f"{n}-{i}" for i, (n, _) in
                                                                enumerate(BAD_PERTURB_ARGS)])
def test_bad_perturb_argument_is_named(name, value):
    kwargs = dict(x=torch.zeros(2, 3), gamma=1.0, mode="uniform", seed=0, offset=0, dim=None)
    kwargs[name] = value
    with pytest.raises((ValueError, TypeError), match=name):
        cep.perturb(**kwargs)


@FUZZ
@given(gamma=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=3)),
       seed=st.one_of(st.integers(-2**64, 2**64), st.floats()), mode=st.text(max_size=9),
       offset=st.integers(-2**64, 2**64))
def test_random_stream_arguments_raise_named_errors_or_work(gamma, seed, mode, offset):
    x = torch.zeros(4, 5)
    try:
        out = cep.perturb(x, gamma, mode, seed, offset)
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in ("gamma", "seed", "mode", "offset"))
    else:
        assert out.shape == x.shape and torch.isfinite(out).all()
