"""Rollout test fixtures: the tiny tokenizer, and one torch thread per test (the CI machine has 2 cores)."""
import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from megatron_tr1.demo import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
