import os

import pytest
import torch

import metalearn_fast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_report_header(config):
    info = metalearn_fast.backend_info()
    return (
        f"metalearn_fast backend: {info['active']} "
        f"(compiled CPU={info['compiled_cpu']} CUDA={info['compiled_cuda']}; "
        f"METALEARN_FAST_BACKEND={os.environ.get('METALEARN_FAST_BACKEND', 'auto')}) {info['reason']}"
    )
