"""Peak FLOP/s lookup for MFU, on the names torch.cuda.get_device_name() really returns."""

import pytest

from src.core.throughput import peak_tflops


@pytest.mark.parametrize(
    "name,bf16,fp32,tf32",
    [
        ("NVIDIA H100 80GB HBM3", 989.0, 67.0, 494.0),  # the SXM card
        ("NVIDIA H100 PCIe", 756.0, 51.0, 378.0),
        ("NVIDIA H100 NVL", 835.0, 60.0, 418.0),
        ("NVIDIA H200", 989.0, 67.0, 494.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, 19.5, 156.0),
        ("NVIDIA A100 80GB PCIe", 312.0, 19.5, 156.0),
        ("NVIDIA L40S", 362.0, 91.6, 183.0),
        ("NVIDIA L40", 181.0, 90.5, 90.5),
        ("NVIDIA L4", 121.0, 30.3, 60.0),
        ("NVIDIA A10", 125.0, 31.2, 62.5),
        ("NVIDIA GeForce RTX 4090", 165.0, 82.6, 82.6),
        ("Tesla V100-SXM2-16GB", 125.0, 15.7, 15.7),
        ("Tesla T4", 65.0, 8.1, 8.1),
    ],
)
def test_each_gpu_gets_its_own_row(name, bf16, fp32, tf32):
    assert peak_tflops(name, "bf16", tf32=False) == bf16
    assert peak_tflops(name, "fp16", tf32=True) == bf16
    assert peak_tflops(name, "fp32", tf32=False) == fp32  # plain FP32 units
    assert peak_tflops(name, "fp32", tf32=True) == tf32  # TF32 tensor cores


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090", "NVIDIA B200"])
def test_an_unlisted_gpu_has_no_peak_rather_than_a_neighbours(name):
    assert peak_tflops(name, "bf16", tf32=False) is None
