import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as 32x32 RGB uint8 (1,438 train / 359 test): offline and small."""
    from sslnb.data import load_dataset

    return load_dataset("digits")
