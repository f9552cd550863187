"""Build metalearn_fast._C: CPU kernels always, CUDA kernels when they can be built.

Without a working C++ compiler (or when the build fails for any other reason) the package installs
without its extension, with a warning, and runs on the pure-torch fallback (same results, slower).

Switches (environment variables):
  METALEARN_FAST_EXTENSION=0  skip the extension on purpose: a pure-torch install
  METALEARN_FAST_EXTENSION=1  the extension is required: a failed build fails the install
  METALEARN_FAST_CUDA=0       build the CPU kernels only
  METALEARN_FAST_CUDA=1       build the CUDA kernels too, and fail if that is impossible (implies
                              METALEARN_FAST_EXTENSION=1)
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" when no GPU is visible
  CUDA_HOME               the CUDA toolkit root (found from nvcc when unset)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.path.isfile(
        os.path.join(path, "bin", "nvcc")
    )


def find_cuda_home():
    """The toolkit root: the folder holding include/cuda_runtime.h and the real bin/nvcc.

    torch guesses it from the nvcc on PATH, which goes wrong when that nvcc is a wrapper script
    living outside the toolkit, so we look for the root ourselves and hand it to torch."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script names the real nvcc inside it
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            candidates += re.findall(r"(/[^\s\"']+)/bin/nvcc", head)
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if is_toolkit_root(path):
            return os.path.realpath(path)
    return None


def pip_nvidia_dirs():
    """Include and library folders of pip's nvidia packages (cu13 layout, then cu12's per-library one)."""
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for base in list(nvidia.__path__):
        for inc in [os.path.join(base, "cu13", "include")] + glob.glob(os.path.join(base, "*", "include")):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(os.path.join(inc, "cusparse.h")):
                includes.append(inc)
                lib = os.path.join(os.path.dirname(inc), "lib")
                if os.path.isdir(lib):
                    libs.append(lib)
    return list(dict.fromkeys(includes)), list(dict.fromkeys(libs))


def switch(name):
    """The value of a 0/1 switch, or "" when unset."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return value


EXTENSION = switch("METALEARN_FAST_EXTENSION")
REQUIRED = EXTENSION == "1" or switch("METALEARN_FAST_CUDA") == "1"
if EXTENSION == "0" and REQUIRED:
    sys.exit("METALEARN_FAST_EXTENSION=0 contradicts METALEARN_FAST_CUDA=1")


def cuda_plan():
    """Return (cuda_home, reason): cuda_home is None when CUDA kernels are not built, with the reason."""
    wanted = switch("METALEARN_FAST_CUDA")
    if wanted == "0":
        return None, "METALEARN_FAST_CUDA=0"
    import torch

    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        home = find_cuda_home()
        reason = "no CUDA toolkit found (set CUDA_HOME to the folder holding include/cuda_runtime.h)"
        if home:
            return home, ""
    if wanted == "1":
        sys.exit(f"METALEARN_FAST_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return None, reason


cuda_home, no_cuda_reason = cuda_plan() if EXTENSION != "0" else (None, "METALEARN_FAST_EXTENSION=0")
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import time

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if cuda_home:
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU's"


def write_build_info(folder):
    """A header the extension reports through backend_info(): what was compiled, for what, against what."""
    os.makedirs(folder, exist_ok=True)
    text = (
        "#pragma once\n"
        f"#define METALEARN_FAST_WITH_CUDA {1 if cuda_home else 0}\n"
        f"#define METALEARN_FAST_CUDA_ARCH_LIST \"{arch_list if cuda_home else ''}\"\n"
        f"#define METALEARN_FAST_TORCH_VERSION \"{torch.__version__}\"\n"
        f"#define METALEARN_FAST_CUDA_VERSION \"{torch.version.cuda or ''}\"\n"
        f"#define METALEARN_FAST_NO_CUDA_REASON \"{no_cuda_reason}\"\n"
    )
    path = os.path.join(folder, "metalearn_fast_build_info.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the timestamp when nothing changed, so ninja rebuilds nothing
        with open(path, "w") as f:
            f.write(text)


def extension():
    generated = os.path.join(ROOT, "build", "generated")
    write_build_info(generated)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/composite/*.cpp"))
    # torch adds the C++ standard it needs; without errno, sqrt in a loop vectorises (the optimizer update)
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc"), generated]
    if not cuda_home:
        print(f"metalearn_fast: building CPU kernels only ({no_cuda_reason})", flush=True)
        return cpp_extension.CppExtension(
            "metalearn_fast._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    nvidia_includes, nvidia_libs = pip_nvidia_dirs()
    missing = not os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h"))
    if missing and not nvidia_includes:
        print("metalearn_fast: warning: the toolkit has no cublas headers and pip's nvidia packages were not found")
    print(f"metalearn_fast: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={arch_list})", flush=True)
    link_dirs = [d for d in nvidia_libs if glob.glob(os.path.join(d, "libcublasLt.so*"))]
    cublaslt = "-lcublasLt"
    if link_dirs and not glob.glob(os.path.join(link_dirs[0], "libcublasLt.so")):
        cublaslt = "-l:" + os.path.basename(sorted(glob.glob(os.path.join(link_dirs[0], "libcublasLt.so.*")))[0])
    return cpp_extension.CUDAExtension(
        "metalearn_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + (nvidia_includes if missing else []),
        library_dirs=link_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp", cublaslt],
    )


class OptionalBuildExtension(cpp_extension.BuildExtension):
    """Builds the extension; when that fails and it is not required, installs without it, with a warning."""

    def run(self):
        try:
            super().run()
        except (Exception, SystemExit) as error:  # a missing compiler raises CalledProcessError, setuptools SystemExit
            if REQUIRED:
                raise
            line = "=" * 78
            print(f"\n{line}\nWARNING: metalearn_fast: the C++/CUDA extension could not be built "
                  f"({type(error).__name__}: {error}).\nInstalling the pure-torch package: same results, slower. "
                  "Set METALEARN_FAST_EXTENSION=1 to make this an error,\nor METALEARN_FAST_EXTENSION=0 to skip "
                  f"the build on purpose.\n{line}\n", file=sys.stderr, flush=True)


if EXTENSION == "0":
    print("metalearn_fast: METALEARN_FAST_EXTENSION=0: installing the pure-torch package, no extension", flush=True)
setup(
    ext_modules=[] if EXTENSION == "0" else [extension()],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
)
