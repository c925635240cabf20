"""csrc/cuda_build_check.py, the checker of `make cuda-build-check`, exercised on the build at hand (CPU here): it must
name every missing CUDA kernel, accept the fake kernels, and read the SASS architectures out of a fatbinary."""
import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from models import cep

_spec = importlib.util.spec_from_file_location(
    "cuda_build_check", Path(__file__).resolve().parents[1] / "csrc" / "cuda_build_check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

needs_extension = pytest.mark.skipif(not cep.HAS_EXTENSION, reason="models._C is not built")


@needs_extension
def test_every_op_has_a_cpu_kernel_and_missing_cuda_kernels_are_named():
    ops = check.cep_ops()
    assert set(check.REQUIRED_OPS) <= set(ops)
    errors = check.check_registrations(ops)
    if torch.version.cuda is None:  # a CPU torch builds a CppExtension: no op has a CUDA kernel
        assert errors == [f"{op} has no CUDA kernel in the dispatcher (TORCH_LIBRARY_IMPL(cep, CUDA))" for op in ops]
    else:
        assert errors == []


@needs_extension
def test_fake_kernels_meet_the_op_contracts():
    assert check.check_fake_kernels("meta") == []
    with FakeTensorMode():
        assert check.check_fake_kernels("cuda") == []


SASS, PTX = 2, 1  # fatbinary entry kinds


def fatbinary(entries):
    """A fatbinary container (magic 0xBA55ED50, 16-byte header) with (kind, arch, payload) entries, each behind an
    entry header of the size it declares (72 bytes here): kind, header size, payload size at 8, arch at 28."""
    body = b""
    for kind, arch, payload in entries:
        header = struct.pack("<HHIQ8xHHI", kind, 0x101, 72, len(payload), 0, 0, arch).ljust(72, b"\0")
        body += header + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_sass_architectures_are_read_per_fatbinary(tmp_path):
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF..." + fatbinary([(SASS, 80, b"sass80"), (PTX, 90, b"ptx90"), (SASS, 90, b"sass90!")])
                        + b"\0" * 8 + fatbinary([(SASS, 80, b"sass"), (PTX, 90, b"ptx")]))
    assert check.fatbin_sass_archs(library.read_bytes()) == [{80, 90}, {80}]

    errors, _ = check.check_sass(library, ["a.cu", "b.cu"], "8.0;9.0+PTX")
    assert errors == [f"fatbinary 1 of {library} has SASS for sm_[80], missing sm_[90]"]
    assert check.check_sass(library, ["a.cu", "b.cu", "c.cu"], "8.0")[0] == [
        f"{library} embeds 2 fatbinaries for 3 .cu files"]
