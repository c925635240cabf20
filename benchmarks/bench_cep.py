"""CEP op benchmarks (DESIGN.md §6): the fused cep::cross_attention and cep::perturb against their eager twins.

    python -m benchmarks.bench_cep [--repeats 7] [--threads N]

Prints one markdown table: fused vs eager (perturb + 2 linears + SDPA) forward and forward+backward times and
speed-ups at B=8 H=8 N=1024 Dh=64 C=768 with M=77 and M=1 text tokens, peak memory of forward+backward, achieved
GFLOP/s next to a 4096^2 fp32 matmul measured in the same run, and cep::perturb vs eager at 16M floats. Eager and
fused runs alternate and the table reports medians, so a busy machine slows both alike. On a shared machine, run
with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads otherwise lose their time slices to the other processes.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from models import cep

SHAPE = dict(batch=8, heads=8, queries=1024, head_dim=64, channels=768)
PERTURB_NUMEL = 16 * 2**20
GAMMA = 1.0


def attention_inputs(tokens, requires_grad):
    s = SHAPE
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(s["batch"], s["heads"], s["queries"], s["head_dim"], generator=generator)
    context = torch.randn(s["batch"], tokens, s["channels"], generator=generator)
    w_k = torch.randn(s["heads"] * s["head_dim"], s["channels"], generator=generator) * s["channels"] ** -0.5
    w_v = torch.randn(s["heads"] * s["head_dim"], s["channels"], generator=generator) * s["channels"] ** -0.5
    return [t.requires_grad_(requires_grad) for t in (q, context, w_k, w_v)]


def eager_cross_attention(q, context, w_k, w_v):
    """The eager twin: CEP-U perturbation, two linears and SDPA, as a model would write it without the fused op."""
    batch, heads, _, head_dim = q.shape
    tokens, channels = context.shape[1:]
    noisy = context + GAMMA / channels**0.5 * (2 * torch.rand_like(context) - 1)
    k = F.linear(noisy, w_k).view(batch, tokens, heads, head_dim).transpose(1, 2)
    v = F.linear(noisy, w_v).view(batch, tokens, heads, head_dim).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def fused_cross_attention(q, context, w_k, w_v):
    return cep.cross_attention(q, context, w_k, w_v, gamma=GAMMA, mode="uniform", seed=1)


IMPLEMENTATIONS = {"eager": eager_cross_attention, "fused": fused_cross_attention}


def step(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    for t in inputs:
        t.grad = None


def alternating_medians(fns, repeats):
    """Median wall time (ms) of each callable, run in alternation after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def attention_flops(tokens, backward):
    """Model FLOPs: K/V projections + QK^T + PV; backward counted as twice the forward (the usual convention)."""
    s = SHAPE
    width = s["heads"] * s["head_dim"]
    forward = 2 * 2 * s["batch"] * tokens * s["channels"] * width \
        + 2 * 2 * s["batch"] * s["heads"] * s["queries"] * tokens * s["head_dim"]
    return 3 * forward if backward else forward


def read_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_peak_memory(name, tokens):
    """Peak resident memory (MiB) of one forward+backward above the resident memory before it. Runs in this process
    (called through a subprocess, see peak_memory_mib): /proc/self/clear_refs resets the kernel's high-water mark."""
    inputs = attention_inputs(tokens, requires_grad=True)
    step(IMPLEMENTATIONS[name], inputs, backward=True)  # warm-up: libraries, thread pools
    baseline = read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step(IMPLEMENTATIONS[name], inputs, backward=True)
    return (read_status_kib("VmHWM") - baseline) / 1024


def peak_memory_mib(name, tokens):
    # A fresh process per measurement; a fixed mmap threshold makes glibc return every large buffer to the OS on
    # free, so resident memory follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_cep", "--memory-of", name, str(tokens)],
                            env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def matmul_gflops(repeats):
    a = torch.randn(4096, 4096)
    ms = alternating_medians({"mm": lambda: a @ a}, repeats)["mm"]
    return 2 * 4096**3 / ms / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--memory-of", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(measure_peak_memory(args.memory_of[0], int(args.memory_of[1])))
        return
    if not cep.HAS_EXTENSION:
        sys.exit("bench_cep: models._C is not built (run `make install`)")

    peak = matmul_gflops(args.repeats)
    rows = []
    for tokens in (77, 1):
        for backward in (False, True):
            inputs = attention_inputs(tokens, requires_grad=backward)
            ms = alternating_medians({name: (lambda fn=fn: step(fn, inputs, backward))
                                      for name, fn in IMPLEMENTATIONS.items()}, args.repeats)
            gflops = attention_flops(tokens, backward) / ms["fused"] / 1e6
            bar = ">= 1.5x" if backward else "-"
            rows.append((f"cross_attention M={tokens} {'fwd+bwd' if backward else 'fwd'}", f"{ms['eager']:.1f} ms",
                         f"{ms['fused']:.1f} ms", f"{ms['eager'] / ms['fused']:.2f}x",
                         f"{gflops:.0f} GFLOP/s ({100 * gflops / peak:.0f}% of matmul)", bar))
        memory = {name: peak_memory_mib(name, tokens) for name in IMPLEMENTATIONS}
        rows.append((f"cross_attention M={tokens} fwd+bwd peak memory", f"{memory['eager']:.1f} MiB",
                     f"{memory['fused']:.1f} MiB", f"{memory['eager'] / max(memory['fused'], 1e-9):.2f}x", "-",
                     "fused <= eager"))

    x = torch.randn(PERTURB_NUMEL)
    scale = GAMMA / x.shape[-1] ** 0.5
    ms = alternating_medians({"eager": lambda: x + scale * (2 * torch.rand_like(x) - 1),
                              "fused": lambda: cep.perturb(x, GAMMA, "uniform", seed=1),
                              "copy": lambda: x.clone()}, args.repeats)
    rows.append(("perturb 16M floats (uniform)", f"{ms['eager']:.1f} ms", f"{ms['fused']:.1f} ms",
                 f"{ms['eager'] / ms['fused']:.2f}x", f"plain copy {ms['copy']:.1f} ms", ">= 4x"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; 4096^2 matmul: {peak:.0f} GFLOP/s; "
          f"shapes B={SHAPE['batch']} H={SHAPE['heads']} N={SHAPE['queries']} Dh={SHAPE['head_dim']} "
          f"C={SHAPE['channels']}; medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print("| case | eager twin | fused (models._C) | speed-up | achieved | bar |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
