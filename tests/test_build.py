"""The build itself: the libraries load, register the ops, link only what every torch >= 2.10
provides, and the wheel is tagged abi3.

CI sets REATTENTION_TEST_INSTALLED=1 (the package under test must be the installed one, not
the source tree) and REATTENTION_WHEEL=<path of the wheel it built>.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

from conftest import needs_cpp_error_path

import reattention
from reattention import ops

PKG_DIR = os.path.dirname(os.path.abspath(reattention.__file__))
CPU_LIB = ops._find_library("_C")
CUDA_LIB = ops._find_library("_C_cuda")
OPS = ("chunk_reps", "select_chunks", "gather_attention")
# Libraries that exist only in CUDA builds of torch (or CUDA itself): _C must need none.
CUDA_ONLY = re.compile(r"cuda|cudart|cublas|nvrtc|c10_cuda|torch_cuda")

needs_binutils = pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("nm") is None,
                                    reason="binutils (readelf, nm) not installed")


def needed_libraries(path):
    out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def dynamic_symbols(path, undefined):
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, path], check=True, capture_output=True,
                         text=True).stdout
    # Lines are "[address] TYPE name[@version]"; weak undefined symbols ("w") may stay unresolved.
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2] not in ("w", "v"):
            syms.add(parts[-1])
    return syms


def torch_lib(name):
    path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
    assert os.path.exists(path), f"{name} not found in this torch ({torch.__version__})"
    return path


def test_cpu_library_loads_and_registers_the_ops():
    assert CPU_LIB is not None, f"no _C library in {PKG_DIR}"
    assert ops.available_backends()["cpu"] is None, ops.available_backends()["cpu"]
    for name in OPS:
        packet = getattr(torch.ops.reattention, name)
        assert "CPU" in torch._C._dispatch_dump(f"reattention::{name}"), name
        assert packet.default._schema.name == f"reattention::{name}"
    schema = str(torch.ops.reattention.gather_attention.default._schema)
    assert schema.endswith("-> (Tensor, Tensor)"), schema


def test_tests_run_the_installed_package():
    if os.environ.get("REATTENTION_TEST_INSTALLED") != "1":
        pytest.skip("REATTENTION_TEST_INSTALLED is not set (a source-tree run)")
    site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    assert os.path.dirname(os.path.realpath(PKG_DIR)) in site, (
        f"reattention imported from {PKG_DIR}, not from site-packages {sorted(site)}")


@needs_binutils
def test_cpu_library_needs_no_cuda_library():
    assert CPU_LIB is not None
    needed = needed_libraries(CPU_LIB)
    assert "libtorch_cpu.so" in needed, needed
    assert not [n for n in needed if CUDA_ONLY.search(n)], needed


@needs_binutils
@pytest.mark.parametrize("lib", ["_C", "_C_cuda"])
def test_undefined_symbols_resolve_in_this_torch(lib):
    """Every unversioned undefined symbol is exported by this torch's libraries.

    Versioned ones (GLIBC_*, GLIBCXX_*, CXXABI_*, GCC_*) come from the C/C++ runtime. Run under
    an older torch (CI's torch 2.13 venv) this shows the build needs nothing newer.
    """
    path = CPU_LIB if lib == "_C" else CUDA_LIB
    if path is None:
        pytest.skip(f"{lib} was not built")
    providers = ["libtorch_cpu.so"]
    if lib == "_C_cuda":
        if not torch.version.cuda:
            pytest.skip("a CPU build of torch has no libtorch_cuda.so")
        providers.append("libtorch_cuda.so")
        assert not [n for n in needed_libraries(path) if "cudart" in n], "cudart must be static"
    exported = set()
    for name in providers:
        exported |= dynamic_symbols(torch_lib(name), undefined=False)
    wanted = {s for s in dynamic_symbols(path, undefined=True) if "@" not in s}
    missing = sorted(wanted - exported)
    assert not missing, f"{lib} needs symbols torch {torch.__version__} lacks: {missing[:20]}"


def test_cuda_library_loads_without_a_gpu():
    """_C_cuda loads under any CUDA build of torch, GPU or not (only registration runs)."""
    if CUDA_LIB is None:
        pytest.skip("_C_cuda was not built (no nvcc at build time)")
    if not torch.version.cuda:
        assert ops.available_backends()["cuda"] is not None, "CPU torch must not load _C_cuda"
        pytest.skip("a CPU build of torch cannot load a CUDA library")
    code = ("import sys, torch\n"
            "for path in sys.argv[1:]: torch.ops.load_library(path)\n"
            "print(torch._C._dispatch_dump('reattention::select_chunks'))")
    res = subprocess.run([sys.executable, "-c", code, CPU_LIB, CUDA_LIB], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "CUDA" in res.stdout, res.stdout


def test_wheel_is_abi3():
    wheel = os.environ.get("REATTENTION_WHEEL")
    if not wheel:
        pytest.skip("REATTENTION_WHEEL is not set (no wheel was built for this run)")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        info = zf.read(meta).decode()
    assert re.search(r"^Tag: cp39-abi3-\S+$", info, re.M), info
    assert "Root-Is-Purelib: false" in info, info
    assert "-cp39-abi3-" in os.path.basename(wheel), wheel
    assert "reattention/_C.abi3.so" in names, names
    assert {"reattention/__init__.py", "reattention/ops/__init__.py",
            "reattention/needle/__init__.py"} <= set(names), names
    # The Triton twins ship inside the package, never as a top-level triton_kernels (the
    # Triton project publishes a package of that name).
    assert "reattention/triton_kernels/__init__.py" in names, names
    assert not any(n.startswith("triton_kernels/") for n in names), names
    # The needle demo (python -m reattention) runs offline from the weights in the package.
    assert {"reattention/needle/weights/config.json",
            "reattention/needle/weights/model.safetensors"} <= set(names), names
    if os.environ.get("REATTENTION_WHEEL_CUDA") == "1":
        assert "reattention/_C_cuda.abi3.so" in names, names


SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isfile(os.path.join(SOURCE_ROOT, "setup.py")),
                    reason="tests/ is not inside a source tree")
def test_sdist_holds_what_a_build_needs(tmp_path):
    """setup.py drives CMake over csrc/; neither is a Python package, so only MANIFEST.in
    brings them into the sdist (without it `pip install reattention-*.tar.gz` fails)."""
    src = tmp_path / "src"
    shutil.copytree(SOURCE_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".*venv*", "bench"))
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                         cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (tarball,) = tmp_path.glob("reattention-*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    want = {"CMakeLists.txt", "setup.py", "pyproject.toml", "tests/conftest.py",
            "tests/cases.py", "reattention/needle/weights/model.safetensors",
            "triton_kernels/__init__.py"}
    for dirpath, _, files in os.walk(os.path.join(SOURCE_ROOT, "csrc")):
        want |= {os.path.relpath(os.path.join(dirpath, f), SOURCE_ROOT) for f in files}
    assert want <= names, sorted(want - names)


def _op_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 16, generator=g)
    k = torch.randn(1, 2, 100, 16, generator=g)
    lens = torch.tensor([90], dtype=torch.int32)
    inv = torch.ones(8)
    # sink 4, local 8, chunk 8: (90 - 2 - 8 - 4) // 8 = 9 middle chunks.
    idx = torch.tensor([0, 3, 8, -1], dtype=torch.int32).expand(1, 2, 1, 4).contiguous()
    return q, k, lens, inv, idx


def _gather(q, k, lens, idx, inv):
    return torch.ops.reattention.gather_attention(q, k, k, lens, idx, inv, 4, 8, 8, 8, 0.25, 1.0,
                                                  "half", "compact")


BAD_CALLS = {
    # name: (what the message names, call)
    "seqlen_past_nmax": ("cache_seqlens", lambda q, k, lens, inv, idx:
                         _gather(q, k, torch.tensor([101], dtype=torch.int32), idx, inv)),
    "seqlen_int64": ("cache_seqlens", lambda q, k, lens, inv, idx:
                     _gather(q, k, lens.long(), idx, inv)),
    "idx_past_middle": ("idx", lambda q, k, lens, inv, idx:
                        _gather(q, k, lens, torch.full_like(idx, 9), inv)),
    "idx_below_minus_one": ("idx", lambda q, k, lens, inv, idx:
                            _gather(q, k, lens, torch.full_like(idx, -2), inv)),
    "idx_wrong_blocks": ("idx", lambda q, k, lens, inv, idx:
                         _gather(q, k, lens, idx.expand(1, 2, 2, 4).contiguous(), inv)),
    "inv_freq_too_long": ("inv_freq", lambda q, k, lens, inv, idx:
                          _gather(q, k, lens, idx, torch.ones(9))),
    "q_dtype": ("q", lambda q, k, lens, inv, idx: _gather(q.double(), k, lens, idx, inv)),
    "gqa": ("Hq", lambda q, k, lens, inv, idx: _gather(q[:, :3], k, lens, idx, inv)),
    "reps_too_short": ("reps", lambda q, k, lens, inv, idx: torch.ops.reattention.select_chunks(
        q, k, torch.zeros(1, 2, 3, 2, 16), lens, 4, 8, 8, 2, "bound", 8)),
    "reps_missing": ("reps", lambda q, k, lens, inv, idx: torch.ops.reattention.select_chunks(
        q, k, None, lens, 4, 8, 8, 2, "mean", 8)),
    "chunk_reps_max": ("rep", lambda q, k, lens, inv, idx: torch.ops.reattention.chunk_reps(
        k, lens, torch.zeros(1, 2, 12, 16), 4, 8, "max", 0)),
    "unknown_style": ("rope_style", lambda q, k, lens, inv, idx:
                      torch.ops.reattention.gather_attention(q, k, k, lens, idx, inv, 4, 8, 8, 8,
                                                             0.25, 1.0, "spiral", "compact")),
}


@needs_cpp_error_path
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_cpu_kernels_refuse_out_of_bounds_inputs(case):
    """The C++ input check (csrc/common.h) raises before a CPU kernel could read out of bounds."""
    what, call = BAD_CALLS[case]
    q, k, lens, inv, idx = _op_inputs()
    _gather(q, k, lens, idx, inv)  # the unmodified call is fine
    with pytest.raises(RuntimeError, match=what):
        call(q, k, lens, inv, idx)
