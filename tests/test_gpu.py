"""CUDA execution provider: same results as CPU.  Skips without onnxruntime-gpu or a GPU."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx_factory import make_model

from agent.detector import Detector

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        pytest.skip(f"CUDAExecutionProvider not in this onnxruntime build "
                    f"(onnxruntime {ort.__version__}, providers {available}); install onnxruntime-gpu")


@pytest.mark.parametrize("kind", ["affine", "timemix"])
def test_cuda_matches_cpu(cuda, tmp_path, kind):
    path, _ = make_model(tmp_path / f"{kind}.onnx", window=32, channels=8, kind=kind)
    gpu = Detector(str(path), providers=["cuda", "cpu"], max_batch=64)
    if gpu.ep != "CUDAExecutionProvider":
        pytest.skip(f"onnxruntime-gpu is installed but CUDA did not initialise (got {gpu.ep}): "
                    f"no usable GPU or CUDA/cuDNN libraries")
    cpu = Detector(str(path), providers=["cpu"])
    x = np.random.default_rng(0).normal(size=(200, 32, 8)).astype(np.float32)
    np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), rtol=1e-4, atol=1e-4)
