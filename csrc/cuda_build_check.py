"""What can be verified of a CUDA build of models._C without a GPU (run by csrc/cuda_build_check.sh).

Importing models._C proves the extension linked: Python dlopens it with RTLD_NOW, so every symbol from libtorch_cuda,
libc10_cuda and libcudart must resolve. Then, for every op of the `cep` library: a CPU and a CUDA kernel in the
dispatcher; fake kernels that give the documented output shapes and dtypes (DESIGN.md §4) on the meta device and for
fake CUDA tensors; SASS for each TORCH_CUDA_ARCH_LIST architecture in every CUDA translation unit. No kernel is
executed. Exits non-zero with one line per failure.
"""
import argparse
import os
import re
import struct
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

REQUIRED_OPS = ("cep::perturb", "cep::cross_attention", "cep::cross_attention_backward")
BACKEND_KEYS = ("CPU", "CUDA")

# nvcc's fatbinary container (undocumented; layout as read by cuobjdump-free tools such as gpgpu-sim): a 16-byte header
# (magic, version, header size, payload size) followed by entries, each with its own header giving kind (1 = PTX,
# 2 = SASS ELF), payload size and the sm architecture.
FATBIN_MAGIC = 0xBA55ED50
FATBIN_HEADER = struct.Struct("<IHHQ")
FATBIN_ENTRY = struct.Struct("<HHIQ8xHHI")  # kind, _, header size, payload size, _, minor, major, arch
KIND_SASS = 2


def cep_ops():
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("cep::"))


def check_registrations(ops):
    errors = [f"{op} is not declared (TORCH_LIBRARY(cep) in csrc/ops.cpp)" for op in REQUIRED_OPS if op not in ops]
    for op in ops:
        for key in BACKEND_KEYS:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                errors.append(f"{op} has no {key} kernel in the dispatcher (TORCH_LIBRARY_IMPL(cep, {key}))")
    return errors


def check_fake_kernels(device):
    """Output shapes, dtypes and device of the fake kernels against the op contracts (lse is fp32, fp64 for fp64)."""
    errors = []

    def expect(what, tensor, shape, dtype):
        if tensor.device.type != device or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            errors.append(f"{what} on {device}: got {tensor.device.type} {tuple(tensor.shape)} {tensor.dtype}, "
                          f"expected {shape} {dtype}")

    b, h, n, dh, m, c = 2, 3, 5, 8, 7, 12
    for dtype, lse_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                             (torch.bfloat16, torch.float32)):
        def empty(*shape, dtype=dtype):
            return torch.empty(shape, dtype=dtype, device=device)

        q, context, w_k, w_v = empty(b, h, n, dh), empty(b, m, c), empty(h * dh, c), empty(h * dh, c)
        key_mask = empty(b, m, dtype=torch.bool)
        stream = (1.0, "uniform", 0, 0, c)
        expect(f"perturb {dtype}", torch.ops.cep.perturb(context, *stream), (b, m, c), dtype)
        out, lse = torch.ops.cep.cross_attention(q, context, w_k, w_v, key_mask, *stream)
        expect(f"cross_attention out {dtype}", out, (b, h, n, dh), dtype)
        expect(f"cross_attention lse {dtype}", lse, (b, h, n), lse_dtype)
        grads = torch.ops.cep.cross_attention_backward(out, q, context, w_k, w_v, key_mask, out, lse, *stream)
        for name, grad, like in zip(("q", "context", "w_k", "w_v"), grads, (q, context, w_k, w_v)):
            expect(f"cross_attention_backward grad_{name} {dtype}", grad, tuple(like.shape), dtype)
    return errors


def fatbin_sass_archs(blob):
    """The sm architectures with SASS in each fatbinary embedded in `blob` (one per CUDA translation unit)."""
    magic = struct.pack("<I", FATBIN_MAGIC)
    archs_per_fatbin, start = [], blob.find(magic)
    while start >= 0:
        _, _, header_size, size = FATBIN_HEADER.unpack_from(blob, start)
        archs, entry, end = set(), start + header_size, start + header_size + size
        while entry + FATBIN_ENTRY.size <= end:
            kind, _, entry_header, payload, _, _, arch = FATBIN_ENTRY.unpack_from(blob, entry)
            if kind == KIND_SASS:
                archs.add(arch)
            entry += entry_header + payload
        archs_per_fatbin.append(archs)
        start = blob.find(magic, end)
    return archs_per_fatbin


def check_sass(library, cuda_sources, arch_list):
    # torch accepts "8.0;9.0", "8.0 9.0" and "+PTX" suffixes (PTX is not SASS: only the number counts here).
    wanted = {int(arch.split("+")[0].replace(".", "")) for arch in re.split(r"[;, ]+", arch_list.strip()) if arch}
    fatbins = fatbin_sass_archs(Path(library).read_bytes())
    errors = []
    if len(fatbins) < len(cuda_sources):
        errors.append(f"{library} embeds {len(fatbins)} fatbinaries for {len(cuda_sources)} .cu files")
    for index, archs in enumerate(fatbins):
        if not wanted <= archs:
            errors.append(f"fatbinary {index} of {library} has SASS for sm_{sorted(archs)}, "
                          f"missing sm_{sorted(wanted - archs)}")
    return errors, fatbins


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="the tree that was pip-installed (holds csrc/cuda)")
    parser.add_argument("--arch-list", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"),
                        help="architectures whose SASS must be embedded (default: $TORCH_CUDA_ARCH_LIST)")
    args = parser.parse_args()

    import models._C  # runs the static TORCH_LIBRARY registrations; fails here if the library did not link
    import models.cep  # registers the fake kernels and autograd

    if Path(models._C.__file__).resolve().parent != (args.src / "models").resolve():
        sys.exit(f"cuda-build-check: imported {models._C.__file__}, not the build in {args.src}")
    ops = cep_ops()
    print(f"cuda-build-check: imported {models._C.__file__} with torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}); ops: {', '.join(ops)}")
    errors = check_registrations(ops) + check_fake_kernels("meta")
    with FakeTensorMode():  # CUDA tensors without a GPU, as torch.compile traces them: the fake kernels keep the device
        errors += check_fake_kernels("cuda")
    sass_errors, fatbins = check_sass(models._C.__file__, sorted(args.src.glob("csrc/cuda/*.cu")), args.arch_list)
    errors += sass_errors
    if errors:
        sys.exit("cuda-build-check: FAILED\n  " + "\n  ".join(errors))
    print(f"cuda-build-check: OK: {len(ops)} ops with {' and '.join(BACKEND_KEYS)} kernels registered, fake kernels "
          f"give the documented shapes (meta and fake CUDA), SASS for sm_{sorted(set().union(*fatbins))} in each of "
          f"{len(fatbins)} fatbinaries; nothing was executed on a GPU")


if __name__ == "__main__":
    main()
