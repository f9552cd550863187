import contextlib
import os

import pytest
import torch

import metalearn_fast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@contextlib.contextmanager
def forced_cpu_simd(level: str):
    """The extension's hand-written CPU kernels forced to ``level`` ("none", "avx2", "avx512") inside the block;
    the test is skipped on a CPU without it, and on the fallback (no compiled kernels) the block just runs."""
    extension = metalearn_fast.ops._extension
    if extension is None:
        yield
        return
    levels = metalearn_fast._ext.CPU_SIMD  # lowest first
    if levels.index(level) > levels.index(extension.CPU_SIMD_AVAILABLE):
        pytest.skip(f"this CPU has no {level.upper()}")
    before = extension.set_cpu_simd(level)
    assert extension.cpu_simd() == level
    try:
        yield
    finally:
        extension.set_cpu_simd(before)


def pytest_report_header(config):
    info = metalearn_fast.backend_info()
    return (
        f"metalearn_fast backend: {info['active']} "
        f"(compiled CPU={info['compiled_cpu']} CUDA={info['compiled_cuda']}; "
        f"METALEARN_FAST_BACKEND={os.environ.get('METALEARN_FAST_BACKEND', 'auto')}) {info['reason']}"
    )
