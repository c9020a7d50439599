"""Build the reattention extension libraries with CMake (CMakeLists.txt is the one build description).

setup.py only gathers what CMake cannot know (torch's include and library folders, which
nvcc to use) and copies the results into the package:

- ``reattention/_C.abi3.so``: op schemas and CPU kernels; links libtorch_cpu only.
- ``reattention/_C_cuda.abi3.so``: CUDA kernels; built whenever nvcc is found (CUDA_HOME or
  PATH) and the building torch is a CUDA build (it links libtorch_cuda), whatever
  torch.cuda.is_available() says, so a GPU-less machine still compiles them.

Both use only the LibTorch stable ABI and no Python C API, so they are loaded with
``torch.ops.load_library`` and the wheel is tagged ``cp39-abi3``: one build for every
CPython >= 3.9 and torch >= 2.10.

Environment: REATTENTION_CUDA_ARCHS (e.g. "90a" or "80;90a", read by CMake),
REATTENTION_NO_CUDA=1 (skip the CUDA library), CMAKE_BUILD_PARALLEL_LEVEL (compile jobs),
REATTENTION_BUILD_TYPE (CMake build type, default Release).
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
# Stable ABI + no Python.h: the libraries work with any CPython >= 3.9.
LIMITED_API = "cp39"


def find_nvcc():
    """Path of nvcc from CUDA_HOME/CUDA_PATH or PATH, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    """A library built by the CMake target of the same name (no sources of its own here)."""

    def __init__(self, name, target):
        super().__init__(name, sources=[], py_limited_api=True)
        self.target = target


class CMakeBuild(build_ext):
    """Configure and build every CMake target once, then copy each library into place."""

    def run(self):
        self._configure_and_build()
        super().run()

    def _configure_and_build(self):
        import torch
        from torch.utils import cpp_extension

        build_temp = os.path.abspath(self.build_temp)
        os.makedirs(build_temp, exist_ok=True)
        include_dirs = cpp_extension.include_paths()
        library_dirs = cpp_extension.library_paths()
        nvcc = None if os.environ.get("REATTENTION_NO_CUDA") == "1" else find_nvcc()
        has_torch_cuda = any(os.path.exists(os.path.join(d, "libtorch_cuda.so"))
                             for d in library_dirs)
        if nvcc is None:
            print("reattention: no nvcc, building the CPU library only", flush=True)
        elif not has_torch_cuda:
            # A CPU build of torch has no libtorch_cuda to link the CUDA library against.
            print(f"reattention: torch {torch.__version__} is a CPU build, "
                  "building the CPU library only", flush=True)
            nvcc = None
        else:
            print(f"reattention: building the CUDA library with {nvcc}", flush=True)
        args = [
            "cmake", "-S", ROOT, "-B", build_temp, "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=" + os.environ.get("REATTENTION_BUILD_TYPE", "Release"),
            "-DTORCH_INCLUDE_DIRS=" + ";".join(include_dirs),
            "-DTORCH_LIBRARY_DIRS=" + ";".join(library_dirs),
            "-DREATTENTION_CUDA=" + ("ON" if nvcc else "OFF"),
        ]
        if nvcc:
            args.append("-DCMAKE_CUDA_COMPILER=" + nvcc)
        subprocess.check_call(args)
        build = ["cmake", "--build", build_temp]
        if self.parallel:
            build += ["--parallel", str(self.parallel)]
        subprocess.check_call(build)
        # Package only this build's targets: a library left in build_temp by an earlier
        # configuration (the CUDA one, say) must not slip in.
        targets = {"_C"} | ({"_C_cuda"} if nvcc else set())
        self.extensions = [e for e in self.extensions if e.target in targets]
        self._built = {e.name: os.path.join(build_temp, e.target + ".so") for e in self.extensions}
        missing = [p for p in self._built.values() if not os.path.exists(p)]
        if missing:
            raise RuntimeError(f"CMake did not produce {missing}")

    def build_extension(self, ext):
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(self._built[ext.name], dest)


def _bdist_wheel_options():
    # Tag the wheel cp39-abi3 only where that tag is honest: CPython.
    if sysconfig.get_config_var("Py_GIL_DISABLED") or sys.implementation.name != "cpython":
        return {}
    return {"bdist_wheel": {"py_limited_api": LIMITED_API}}


setup(
    ext_modules=[
        CMakeExtension("reattention._C", "_C"),
        CMakeExtension("reattention._C_cuda", "_C_cuda"),
    ],
    cmdclass={"build_ext": CMakeBuild},
    options=_bdist_wheel_options(),
)
