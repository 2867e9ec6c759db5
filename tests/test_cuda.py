"""CUDA against CPU: the same selections, neighbours and scores on both devices.

Every test here is marked `cuda`: tests/conftest.py skips them ("needs a CUDA device") where torch
sees no GPU; on a GPU box `pytest -m cuda` runs them (`python -m experiments.bench.gpu_check` does, with
a report). They take seconds on a GPU.

fp32 on a GPU rounds differently from the CPU (other reduction orders, fused kernels), so a greedy
pick may differ at a near-tie: where picks differ the coverage radius (what k-center minimises)
is compared instead. cuDNN convolutions use TF32 by default on Ampere and newer GPUs (~1e-3
relative error per layer); the end-to-end comparison turns TF32 off, since what it checks is that
the fp32 pipeline gives the fp32 numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchcore.config import BackboneConfig, CoresetConfig, ModelConfig
from patchcore.coreset import coverage_radius, greedy_coreset
from patchcore.distances import nearest_neighbours
from patchcore.model import PatchCore, resolve_device

pytestmark = pytest.mark.cuda
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float32: 20 Gaussian clusters of unequal spread, so the coverage radius is set by
    the wide clusters and a worse selection shows."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g) * 3.0  # (20, d)
    which = torch.randint(0, 20, (n,), generator=g)  # (n,)
    spread = torch.rand(20, generator=g) + 0.5  # (20,)
    return centres[which] + torch.randn(n, d, generator=g) * spread[which, None]


@pytest.mark.parametrize("method", ["approximate", "exact"])
def test_greedy_coreset_fp32_on_cuda_matches_cpu(method):
    x = _clustered(5000, 256, seed=0)  # (5000, 256)
    size = 500
    cpu = greedy_coreset(x, size, method=method, seed=0, precision="float32")
    gpu = greedy_coreset(x.cuda(), size, method=method, seed=0, precision="float32")
    assert gpu.device.type == "cuda"
    gpu = gpu.cpu()
    assert len(set(gpu.tolist())) == size  # distinct picks
    if not torch.equal(gpu, cpu):  # a near-tie broke the other way: same quality, within 0.5%
        r_cpu, r_gpu = coverage_radius(x[cpu], x), coverage_radius(x[gpu], x)
        assert abs(r_gpu - r_cpu) <= 0.005 * r_cpu, (r_gpu, r_cpu)


def test_greedy_coreset_bf16_on_cuda_covers_like_cpu_fp32():
    x = _clustered(5000, 256, seed=1)  # (5000, 256)
    size = 500
    cpu = greedy_coreset(x, size, seed=0, precision="float32")
    gpu = greedy_coreset(x.cuda(), size, seed=0, precision="bfloat16")
    assert gpu.device.type == "cuda"
    gpu = gpu.cpu()
    assert len(set(gpu.tolist())) == size
    r_cpu, r_gpu = coverage_radius(x[cpu], x), coverage_radius(x[gpu], x)
    assert abs(r_gpu - r_cpu) <= 0.02 * r_cpu, (r_gpu, r_cpu)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("max_bytes", [None, 1 << 20])  # the free-memory budget; many chunks
def test_nearest_neighbours_on_cuda_equal_cpu(k, max_bytes):
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(3000, 128, generator=g)  # (M, D)
    queries = torch.randn(1000, 128, generator=g)  # (Q, D)
    d_cpu, i_cpu = nearest_neighbours(queries, bank, k)
    d_gpu, i_gpu = nearest_neighbours(queries.cuda(), bank.cuda(), k, max_bytes=max_bytes)
    assert d_gpu.device.type == "cuda" and i_gpu.device.type == "cuda"
    d_gpu, i_gpu = d_gpu.cpu(), i_gpu.cpu()
    assert torch.allclose(d_gpu, d_cpu, rtol=1e-4)
    differ = i_gpu != i_cpu
    if differ.any():  # only a tie within rounding may order two bank rows differently
        def exact(idx: torch.Tensor) -> torch.Tensor:  # (Q, k)
            return (queries.double()[:, None, :] - bank.double()[idx]).norm(dim=-1)

        assert torch.allclose(exact(i_gpu)[differ], exact(i_cpu)[differ], rtol=1e-4)
        assert differ.float().mean() < 0.01


def _images(n: int, seed: int, defect: bool = False, size: int = 64) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: smooth stripes with noise; `defect` adds a bright square."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 6.28, size)
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    x = 0.5 + 0.3 * torch.sin(ramp[None, None, None, :] * 2 + phase) + 0.05 * torch.randn(n, 3, size, size, generator=g)
    if defect:
        for i in range(n):
            r, c = torch.randint(8, size - 20, (2,), generator=g).tolist()
            x[i, :, r : r + 12, c : c + 12] = 1.0
    return x.clamp(0, 1)


def _small_config() -> ModelConfig:
    # ratio 1.0: the bank is every training patch on both devices, so the scores compare the
    # backbone, the patch embedding and the NN search (the coreset is compared above)
    return ModelConfig(backbone=BackboneConfig("resnet18", ("layer2", "layer3"), "none"),
                       pretrain_embed_dim=64, target_embed_dim=64, layer_weighting="paper",
                       coreset=CoresetConfig(ratio=1.0))


def test_patchcore_fit_predict_on_cuda_matches_cpu():
    train = [_images(4, seed=3), _images(4, seed=4)]  # two batches of (4, 3, 64, 64)
    test = [torch.cat([_images(3, seed=5), _images(3, seed=6, defect=True)])]
    results = {}
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        for device in ("cpu", "cuda"):
            model = PatchCore(_small_config(), device=device, seed=0)
            bank = model.fit(train, progress=False)
            assert bank.features.device.type == device
            results[device] = model.predict(test, progress=False)  # scores (6,), maps (6, 64, 64)
    (s_cpu, m_cpu), (s_gpu, m_gpu) = results["cpu"], results["cuda"]
    assert torch.isfinite(s_gpu).all()
    assert torch.allclose(s_gpu, s_cpu, rtol=1e-3)
    # maps: a normal patch's small distance is a difference of large norms, so an absolute
    # tolerance (1% of the largest value) where the relative one would be too strict
    assert torch.allclose(m_gpu, m_cpu, rtol=1e-3, atol=1e-2 * float(m_cpu.abs().max()))


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"
    assert PatchCore(_small_config()).device.type == "cuda"


def test_real_cuda_out_of_memory_is_one_line_at_the_cli(monkeypatch, capsys):
    import experiments.app.cli as cli

    def huge(args):
        torch.empty(1 << 42, dtype=torch.float32, device="cuda")  # 16 TiB: more than any GPU
        return 0

    monkeypatch.setattr(cli, "cmd_fit", huge)
    assert cli.main(["fit", "--config", str(DEFAULT_CONFIG)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CUDA out of memory during fit (")
    assert "data.batch_size" in err[0]


@pytest.mark.cuda
def test_bf16_search_on_cuda_returns_the_exact_nearest_neighbour():
    from patchcore.distances import Bf16Search

    g = torch.Generator().manual_seed(0)
    bank = torch.rand(3000, 1024, generator=g) * 5 + 3
    queries = bank[torch.randint(0, 3000, (4000,), generator=g)] + 0.3 * torch.randn(4000, 1024, generator=g)
    d, i = Bf16Search(bank.cuda()).search(queries.cuda())
    ref = torch.cdist(queries.double(), bank.double()).square()
    two = torch.topk(ref, 2, dim=1, largest=False)
    clear = (two.values[:, 1] - two.values[:, 0]) > 1e-4 * two.values[:, 0].clamp(min=1.0)
    assert d.is_cuda and clear.float().mean() > 0.99
    assert torch.equal(i.cpu()[clear, 0], ref.argmin(dim=1)[clear])
    torch.testing.assert_close(d.cpu()[:, 0].double(), two.values[:, 0], rtol=1e-5, atol=1e-3)
