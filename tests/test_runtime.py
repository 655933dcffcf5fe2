"""The process and parallel set-up (nemo_optim.runtime); the CPU adaptations it installs are
nemo_optim.cpu's (tests/test_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from nemo_optim import cpu, runtime

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU device shims")


def test_the_parallel_set_up_installs_the_cpu_device_shims_and_removes_them_on_teardown():
    current_device = torch.cuda.current_device
    with runtime.parallel_runtime():
        assert cpu.devices.installed()
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.empty(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        with cpu.adapted():  # a stage's adaptations inside the set-up leave its shims installed
            assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert cpu.devices.installed()
    assert not cpu.devices.installed()
    assert torch.cuda.current_device is current_device


def test_adapted_alone_installs_the_shims_for_its_extent():
    with cpu.adapted():
        assert cpu.devices.installed()
        assert torch.empty(1, device="cuda").device.type == "cpu"
    assert not cpu.devices.installed()
