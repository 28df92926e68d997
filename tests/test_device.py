import pytest
import torch

from difix3d.device import default_device, default_dtype
from difix3d.errors import Difix3DError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(Difix3DError, match="no CUDA GPU here.*--device cpu"):
        default_device("cuda")


def test_cpu_and_dtypes():
    assert default_device("cpu").type == "cpu"
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
