"""A worker's inline run leaves a core to the sink, the API and readers (issue 10, point 11):
torch trains on every usable CPU but one unless BATCHLAB_TORCH_THREADS says otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from worker import tasks


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_every_usable_cpu_but_one(monkeypatch, restore_threads) -> None:
    monkeypatch.delenv("BATCHLAB_TORCH_THREADS", raising=False)
    tasks._set_training_threads()
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)


def test_the_setting_wins(monkeypatch, restore_threads) -> None:
    monkeypatch.setenv("BATCHLAB_TORCH_THREADS", "3")
    tasks._set_training_threads()
    assert torch.get_num_threads() == 3
