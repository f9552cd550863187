import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device to benchmark on (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda asked for but no GPU is visible")
    return torch.device(name)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    import metalearn_fast

    info = metalearn_fast.backend_info()
    gpu = ", ".join(info["devices"]) or "no GPU"
    machine_info["metalearn_fast"] = (
        f"torch {info['torch']}, backend {info['active']}, {gpu}, {torch.get_num_threads()} threads"
    )
