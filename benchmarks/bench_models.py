"""Model benchmarks: parameter counts of the paper presets, forward+backward time per image of the tiny presets, and
the DESIGN §6 bar: DiT-S/2 fp32 train step (B=8, 32x32x4 latents) against diffusers' DiTTransformer2DModel of the same
size in the same run (diffusers is a benchmark-only dependency; the comparison is skipped with a note without it).

    python -m benchmarks.bench_models [--repeats 5] [--batch 32] [--threads N] [--skip-dit-s2]
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build_model
from models.autoencoder import build_autoencoder
from models.diffusion import GaussianDiffusion, make_betas

PAPER_PRESETS = [("dit", "DiT-S/2", 33), ("dit", "DiT-B/2", 130), ("dit", "DiT-L/2", 458), ("dit", "DiT-XL/2", 675),
                 ("dit", "DiT-XL/8", 675), ("unet", "LDM-4", 400), ("unet", "LDM-4-text", 400),
                 ("ae", "vq-f4", None), ("ae", "kl-f8", None)]
TINY_PRESETS = [("dit", "DiT-micro/2"), ("dit", "DiT-tiny/2"), ("unet", "UNet-micro"), ("unet", "UNet-tiny"),
                ("ae", "vq-f4-tiny"), ("ae", "kl-f4-tiny")]


def build(kind, name):
    return build_autoencoder({"preset": name}) if kind == "ae" else build_model({"arch": kind, "preset": name})


def timed(step, repeats):
    """Median wall time of `step` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameter_table():
    print("| preset | params (ours) | paper |")
    print("|---|---|---|")
    for kind, name, paper in PAPER_PRESETS:
        with torch.device("meta"):
            params = sum(p.numel() for p in build(kind, name).parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {f'{paper}M' if paper else '-'} |")


def tiny_step(kind, name, batch):
    """One forward+backward of the training loss on a batch of 8x8 (32x32 for autoencoders) images."""
    torch.manual_seed(0)
    model = build(kind, name).train()
    if kind == "ae":
        x = torch.rand(batch, 1, 32, 32) * 2 - 1
        loss_fn = lambda: model.loss(x)[0]  # noqa: E731
    else:
        diffusion = GaussianDiffusion(make_betas("linear"))
        x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
        loss_fn = lambda: diffusion.training_losses(model, x, {"y": y}).mean()  # noqa: E731

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
    return step


def tiny_table(batch, repeats):
    print(f"\n| tiny preset | params | fwd+bwd ms/image (batch {batch}, fp32, {torch.get_num_threads()} threads) |")
    print("|---|---|---|")
    for kind, name in TINY_PRESETS:
        step = tiny_step(kind, name, batch)
        params = sum(p.numel() for p in build(kind, name).parameters())
        print(f"| {name} | {params / 1e6:.3f}M | {timed(step, repeats) / batch * 1e3:.2f} |")


def train_step(model, forward, batch=8):
    """AdamW train step on random 32x32x4 latents (eps-MSE against random targets), fp32."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 32, 32, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, 1000, (batch,), generator=generator)
    target = torch.randn(batch, 4, 32, 32, generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = (forward(model, x, t, y)[:, :4] - target).square().mean()
        loss.backward()
        optimizer.step()
    return step


def matmul_step(size=4096):
    """A large fp32 matmul: the machine's attainable FLOP rate, measured in the same run."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return lambda: a @ b


def counted_flops(step):
    """Matmul/attention FLOPs of one call (forward and backward), by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def dit_s2_bar(repeats):
    torch.manual_seed(0)
    ours = build_model({"arch": "dit", "preset": "DiT-S/2"}).train()
    contenders = {"ours (cepdiff DiT-S/2)": (ours, train_step(ours, lambda m, x, t, y: m(x, t, y=y)))}
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        DiTTransformer2DModel = None
        print("\ndiffusers is not installed: the DiT-S/2 comparison runs ours only (pip install diffusers)")
    if DiTTransformer2DModel is not None:
        theirs = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                       num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                       norm_type="ada_norm_zero").train()
        contenders["diffusers DiTTransformer2DModel"] = (theirs, train_step(
            theirs, lambda m, x, t, y: m(hidden_states=x, timestep=t, class_labels=y).sample))
    contenders["fp32 matmul 4096^2 (peak)"] = (None, matmul_step())
    flops = {name: counted_flops(step) for name, (_, step) in contenders.items()}   # also the warm-up call
    # Interleave the contenders so background load hits all alike.
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (_, step) in contenders.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(f"\n| DiT-S/2 train step, fp32, B=8, 32x32x4 | params | s/step (median of {repeats}) | img/s | GFLOP/s |")
    print("|---|---|---|---|---|")
    median, rate = {}, {}
    for name, (model, _) in contenders.items():
        median[name] = statistics.median(times[name])
        rate[name] = flops[name] / median[name] / 1e9
        params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M" if model is not None else "-"
        images = f"{8 / median[name]:.2f}" if model is not None else "-"
        print(f"| {name} | {params} | {median[name]:.3f} | {images} | {rate[name]:.1f} |")
    ours_name, *others = list(contenders)
    print(f"train-step FLOPs (fwd+bwd matmuls/attention): {flops[ours_name] / 1e9:.0f} G")
    if len(others) == 2:
        theirs_name, peak_name = others
        speed_up = median[theirs_name] / median[ours_name]
        print(f"speed-up vs diffusers: {speed_up:.2f}x (bar: >= 1.3x); diffusers runs at "
              f"{rate[theirs_name] / rate[peak_name]:.0%} of the matmul peak, so the largest possible speed-up at "
              f"equal FLOPs is {rate[peak_name] / rate[theirs_name]:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="batch for the tiny presets")
    parser.add_argument("--skip-dit-s2", action="store_true", help="skip the DiT-S/2 train-step comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parameter_table()
    tiny_table(args.batch, args.repeats)
    if not args.skip_dit_s2:
        dit_s2_bar(args.repeats)


if __name__ == "__main__":
    main()
