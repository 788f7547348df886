import pytest
import torch
from reference_models import write_reference_csm


@pytest.fixture(scope="session")
def csm_checkpoint(tmp_path_factory):
    """(folder, reference model) for a tiny 8-codebook CSM written by the reference."""
    path = tmp_path_factory.mktemp("csm-tiny")
    return path, write_reference_csm(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
