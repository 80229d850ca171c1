"""Build urda_fast: the C++ CPU extension always, the CUDA extension when a toolkit is there.

Environment switches:
  URDA_FAST_BUILD_CUDA=0|1   force the CUDA extension off / on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default: the visible GPUs, or "8.0;9.0" when none is visible)
  DEBUG=1                    -O0 -g builds
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# setuptools >= 80 runs `setup.py develop` as `pip install -e .` with build isolation, which builds in a fresh
# environment without torch and fails. Disabling isolation for that child pip keeps the promised command working.
if "develop" in sys.argv[1:]:
    os.environ.setdefault("PIP_NO_BUILD_ISOLATION", "0")


def _nvcc_top(nvcc):
    """The toolkit folder of an nvcc, asked of nvcc itself: the one first on PATH may be a wrapper script."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.realpath(line.split("TOP=", 1)[1].strip())
    return None


def find_cuda_home():
    """A CUDA toolkit folder with bin/nvcc and include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_nvcc_top(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def pip_cuda_include_dirs():
    """Header folders of the pip-installed NVIDIA packages (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include
    and that a bare toolkit may lack."""
    try:
        import nvidia  # namespace package from the nvidia-* wheels torch depends on
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def want_cuda(torch_module, cuda_home):
    flag = os.environ.get("URDA_FAST_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    has_cuda_torch = torch_module.version.cuda is not None
    if flag == "1":
        if not has_cuda_torch:
            sys.exit("URDA_FAST_BUILD_CUDA=1 but this torch is a CPU-only build: install a CUDA build of torch.")
        if cuda_home is None:
            sys.exit("URDA_FAST_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder with bin/nvcc.")
        return True
    if not has_cuda_torch:
        print("urda_fast: torch has no CUDA; building the CPU extension only.")
        return False
    if cuda_home is None:
        print("urda_fast: no nvcc found (set CUDA_HOME to build the CUDA kernels); building the CPU extension only.")
        return False
    return True


def cxx_compiler():
    try:
        from torch.utils.cpp_extension import get_cxx_compiler
        return get_cxx_compiler()
    except ImportError:
        return os.environ.get("CXX", "c++")


def shared_cxx_runtime_link_args(cxx):
    """["-l:libstdc++.so.6"] where `cxx` would link the C++ runtime statically, else [].

    A toolchain whose own library folders hold libstdc++.a but no libstdc++.so (the lent GPU machines' /opt/gcc g++)
    links a private copy of the runtime into the extension. Beside the libstdc++.so.6 that torch loads, that copy
    segfaults on its first number formatted into a stream, which is how a failed TORCH_CHECK builds its message: a bad
    call crashed instead of raising. Naming the shared file binds every reference to the process's runtime, as for
    torch itself; where the compiler finds libstdc++.so it links it dynamically already and nothing changes."""

    def find(name):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        path = out.stdout.strip()
        return path if os.path.isabs(path) and os.path.exists(path) else None

    if find("libstdc++.so") or not find("libstdc++.so.6"):
        return []
    print(f"urda_fast: {cxx} would link libstdc++ statically; linking libstdc++.so.6 instead (see setup.py)")
    return ["-l:libstdc++.so.6"]


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # torch.utils.cpp_extension reads it at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: we never read FP exception flags, and without it GCC will not if-convert (so will not
    # vectorise) loops that select between two computed values, such as the masked-class guard in the KL gradient.
    cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fno-trapping-math"]
    link_cxx_runtime = shared_cxx_runtime_link_args(cxx_compiler())
    modules = [
        CppExtension(
            "urda_fast._C",
            sorted(["csrc/urda_fast.cpp"] + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] + link_cxx_runtime,
        )
    ]
    if want_cuda(torch, cuda_home):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        modules.append(
            CUDAExtension(
                "urda_fast._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=[os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs(),
                extra_compile_args={
                    "cxx": opt + ["-std=c++20"],
                    "nvcc": opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
                },
                extra_link_args=link_cxx_runtime,
            )
        )
    return modules


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=False)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
