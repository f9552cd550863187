"""The extension's block cache (csrc/cpu/block_cache.cpp): torch's CPU allocator while convnet.py's meta-step
runs, handing its large feature maps back at the next step instead of glibc's fresh pages. Checked here: a second
meta-step takes no new block from the system, the same numbers come out, torch's allocator is back after the
call (an error included), windows nest, and empty_cpu_cache frees what is kept."""
import pytest
import torch

import metalearn_fast as mf
from metalearn_fast import MAML
from metalearn_fast.ops import reused_cpu_blocks

from test_convnet import make_batch, randomised


def cache():
    ext = mf.ops._extension
    if ext is None:
        pytest.skip("the block cache is the compiled extension's")
    return ext


def stats():
    cached, system_blocks, active = cache().block_cache_stats()
    return {"cached": cached, "system_blocks": system_blocks, "active": active}


def conv4_meta_loss(model, batch):
    return MAML(model, inner_lr=0.4, loss="cross_entropy").meta_loss(batch)


def test_a_second_meta_step_takes_no_block_from_the_system():
    cache()
    mf.empty_cpu_cache()  # what earlier tests left: a kept block of other sizes may serve, and misplace, a map
    model = randomised(mf.nn.conv4(1, 5, hidden=32))
    batch = make_batch("cross_entropy", tasks=3, shape=(1, 28, 28), ways=5)
    first = torch.autograd.grad(conv4_meta_loss(model, batch), list(model.parameters()))
    before = stats()
    assert before["cached"] > 0 and not before["active"]  # the maps of 32 channels at 14x14 are kept blocks
    second = torch.autograd.grad(conv4_meta_loss(model, batch), list(model.parameters()))
    assert stats()["system_blocks"] == before["system_blocks"]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torchs_allocator_is_back_after_the_window_an_error_included():
    cache()
    assert not stats()["active"]
    with pytest.raises(RuntimeError, match="inside"):
        with reused_cpu_blocks():
            assert stats()["active"]
            kept = torch.empty(1 << 16)  # 256 KiB: a block of the cache
            raise RuntimeError("inside")
    assert not stats()["active"]
    kept.fill_(1.0)  # allocated in the window, alive after it
    assert float(kept.sum()) == float(1 << 16)


def test_windows_nest():
    cache()
    with reused_cpu_blocks():
        with reused_cpu_blocks():
            pass
        assert stats()["active"]  # the outer window is still open
    assert not stats()["active"]


def test_empty_cpu_cache_frees_the_kept_blocks():
    cache()
    with reused_cpu_blocks():
        torch.empty(1 << 18)  # 1 MiB, freed at once: kept
    kept = stats()["cached"]
    assert kept >= (1 << 20)
    assert mf.empty_cpu_cache() == kept
    assert stats()["cached"] == 0
    assert mf.empty_cpu_cache() == 0


def test_a_kept_block_serves_a_smaller_request_of_at_least_half_its_size():
    cache()
    mf.empty_cpu_cache()
    with reused_cpu_blocks():
        torch.empty(1 << 18)  # 1 MiB, kept
        taken = stats()["system_blocks"]
        smaller = torch.empty(3 << 16)  # 768 KiB: the kept 1 MiB block
        assert stats()["system_blocks"] == taken
        smaller.fill_(2.0)  # the whole tensor is writable
        assert float(smaller.sum()) == 2.0 * (3 << 16)
        del smaller
        torch.empty(1 << 16)  # 256 KiB: less than half of the kept block, a block of its own
        assert stats()["system_blocks"] == taken + 1
