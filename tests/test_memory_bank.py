"""Memory bank: chunked NN equals brute force; safe file format refuses pickles and tampering."""

import json
import pickle

import pytest
import torch

from patchcore.distances import nearest_neighbours
from patchcore.errors import BankFormatError
from patchcore.memory_bank import MemoryBank, bank_paths


def test_chunked_nn_equals_brute_force():
    torch.manual_seed(0)
    bank, queries = torch.randn(300, 32), torch.randn(257, 32)
    brute = torch.cdist(queries.double(), bank.double())
    ref_d, ref_i = brute.topk(3, dim=1, largest=False)
    d, i = nearest_neighbours(queries, bank, k=3, max_bytes=20_000)  # 8 queries a chunk
    assert torch.equal(i, ref_i)
    assert torch.allclose(d.double(), ref_d, atol=1e-4)
    d2, _ = nearest_neighbours(queries, bank, k=1, squared=True)
    assert torch.allclose(d2.double().squeeze(1), ref_d[:, 0] ** 2, rtol=1e-4)


def test_bank_nearest_returns_squared_distances_hand_computed():
    bank = MemoryBank(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    d, i = bank.nearest(torch.tensor([[3.0, 0.0], [3.0, 5.0]]))
    assert i.squeeze(1).tolist() == [0, 1]
    assert d.squeeze(1).tolist() == pytest.approx([9.0, 1.0])


def test_save_load_round_trip_is_exact(tmp_path):
    bank = MemoryBank(torch.randn(50, 16), {"category": "tire", "seed": 3})
    st, js = bank.save(tmp_path / "banks" / "tire")
    assert st.suffix == ".safetensors" and js.suffix == ".json"
    meta = json.loads(js.read_text())
    assert meta["format_version"] == 1 and len(meta["sha256"]) == 64 and meta["shape"] == [50, 16]
    loaded = MemoryBank.load(tmp_path / "banks" / "tire.safetensors")
    assert torch.equal(loaded.features, bank.features) and loaded.metadata["category"] == "tire"


def test_pickle_file_is_refused(tmp_path):
    MemoryBank(torch.randn(5, 4)).save(tmp_path / "b")
    st, _ = bank_paths(tmp_path / "b")
    st.write_bytes(pickle.dumps({"bank": [1, 2, 3]}))
    with pytest.raises(BankFormatError, match="pickle"):
        MemoryBank.load(st)
    torch.save({"bank": torch.zeros(2)}, st)  # torch.save zip format
    with pytest.raises(BankFormatError, match="pickle"):
        MemoryBank.load(st)


def test_tampered_and_truncated_files_fail_checksum(tmp_path):
    MemoryBank(torch.randn(20, 4)).save(tmp_path / "b")
    st, js = bank_paths(tmp_path / "b")
    data = bytearray(st.read_bytes())
    data[-3] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match="sha256"):
        MemoryBank.load(st)
    st.write_bytes(bytes(data[:40]))
    with pytest.raises(BankFormatError, match="sha256"):
        MemoryBank.load(st)


def test_missing_files_and_wrong_version(tmp_path):
    with pytest.raises(BankFormatError, match="not found"):
        MemoryBank.load(tmp_path / "nothing")
    MemoryBank(torch.randn(3, 4)).save(tmp_path / "b")
    _, js = bank_paths(tmp_path / "b")
    meta = json.loads(js.read_text())
    meta["format_version"] = 99
    js.write_text(json.dumps(meta))
    with pytest.raises(BankFormatError, match="version 99"):
        MemoryBank.load(tmp_path / "b")
    js.write_text("{not json")
    with pytest.raises(BankFormatError, match="not valid JSON"):
        MemoryBank.load(tmp_path / "b")


def test_same_bank_saved_twice_gives_identical_bytes(tmp_path):
    feats = torch.randn(30, 8)
    MemoryBank(feats, {"a": 1}).save(tmp_path / "x")
    MemoryBank(feats, {"a": 1}).save(tmp_path / "y")
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


def test_chunk_follows_memory_budget_and_stays_exact():
    from patchcore.distances import chunk_rows

    assert chunk_rows(1000, 4, 8_000_000) == 1000  # 1000 rows x 1000 bank x 4 B x 2 = 8 MB
    assert chunk_rows(1000, 4, 1) == 1  # never zero
    torch.manual_seed(1)
    bank, queries = torch.randn(64, 8), torch.randn(50, 8)
    ref = torch.cdist(queries.double(), bank.double()).argmin(dim=1)
    for budget in (1, 3000, None):  # one query a chunk, a few, the device default
        _, i = nearest_neighbours(queries, bank, k=1, max_bytes=budget)
        assert torch.equal(i.squeeze(1), ref)


def test_unknown_backend_and_missing_faiss_are_config_errors(monkeypatch):
    from patchcore.errors import ConfigError

    with pytest.raises(ConfigError, match="nn_backend"):
        MemoryBank(torch.randn(5, 4), nn_backend="annoy")
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    bank = MemoryBank(torch.randn(5, 4), nn_backend="faiss")
    with pytest.raises(ConfigError, match="fedpatch\\[faiss\\]"):
        bank.nearest(torch.randn(2, 4))


def test_faiss_flat_equals_torch_exact():
    pytest.importorskip("faiss")
    torch.manual_seed(2)
    feats, queries = torch.randn(400, 32), torch.randn(100, 32)
    d_ref, i_ref = MemoryBank(feats).nearest(queries, k=2)
    d, i = MemoryBank(feats, nn_backend="faiss").nearest(queries, k=2)
    assert torch.equal(i, i_ref) and torch.allclose(d, d_ref, rtol=1e-4, atol=1e-4)


def test_ivfpq_with_full_probe_and_refine_is_exact_and_validates_settings():
    pytest.importorskip("faiss")
    from patchcore.config import IvfPqConfig
    from patchcore.errors import ConfigError

    torch.manual_seed(3)
    feats, queries = torch.randn(600, 32), torch.randn(80, 32)
    d_ref, i_ref = MemoryBank(feats).nearest(queries)
    # every list probed, every bank row re-ranked exactly: must equal the exact search
    full = IvfPqConfig(nlist=4, m=8, nbits=4, nprobe=4, refine=600)
    d, i = MemoryBank(feats, nn_backend="faiss_ivfpq", ivfpq=full).nearest(queries)
    assert torch.equal(i, i_ref) and torch.allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    # without re-ranking the distances are PQ approximations: right shape, not all exact
    approx = MemoryBank(feats, nn_backend="faiss_ivfpq", ivfpq=IvfPqConfig(nlist=4, m=8, nbits=4, nprobe=1))
    d2, i2 = approx.nearest(queries)
    assert d2.shape == (80, 1) and i2.dtype == torch.int64 and not torch.allclose(d2, d_ref)
    with pytest.raises(ConfigError, match="divide"):
        MemoryBank(feats, nn_backend="faiss_ivfpq", ivfpq=IvfPqConfig(m=7)).nearest(queries)
    with pytest.raises(ConfigError, match="too small"):
        MemoryBank(feats[:50], nn_backend="faiss_ivfpq", ivfpq=IvfPqConfig(nlist=64, m=8)).nearest(queries)


def test_switching_backend_drops_the_index():
    pytest.importorskip("faiss")
    bank = MemoryBank(torch.randn(50, 8), nn_backend="faiss")
    bank.nearest(torch.randn(3, 8))
    assert bank._faiss_index is not None
    bank.nn_backend = "torch"
    assert bank._faiss_index is None and bank.nn_backend == "torch"


def _float64_nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force in float64: min squared distance, its (lowest) index, and the runner-up gap."""
    d = torch.cdist(queries.double(), bank.double()).square()
    two = torch.topk(d, 2, dim=1, largest=False)
    return two.values[:, 0], d.argmin(dim=1), two.values[:, 1] - two.values[:, 0]


@pytest.mark.parametrize("seed,dim", [(0, 8), (1, 152), (2, 1024)])
def test_bf16_search_returns_the_exact_nearest_neighbour(seed, dim):
    from patchcore.distances import Bf16Search

    g = torch.Generator().manual_seed(seed)
    bank = torch.rand(700, dim, generator=g) * 5 + 3  # non-negative, far from the origin: large norms
    bank[50] = bank[10]  # a duplicated row: the lower index wins the tie
    queries = bank[torch.randint(0, 700, (1500,), generator=g)] + 0.3 * torch.randn(1500, dim, generator=g)
    queries[:5] = bank[10]  # queries on a bank row (distance 0)
    d, i = Bf16Search(bank).search(queries, max_bytes=1 << 20)  # several chunks
    ref_d, ref_i, gap = _float64_nearest(queries, bank)
    assert d.shape == (1500, 1) and i.shape == (1500, 1) and d.dtype == torch.float32
    torch.testing.assert_close(d[:, 0].double(), ref_d, rtol=1e-5, atol=1e-4)
    clear = gap > 1e-4 * ref_d.clamp(min=1.0)  # not a float32 near-tie
    assert torch.equal(i[clear, 0], ref_i[clear]) and clear.float().mean() > 0.99
    assert i[:5, 0].tolist() == [10] * 5 and d[:5, 0].tolist() == [0.0] * 5


def test_bf16_search_blocks_padding_and_negative_bounds():
    from patchcore.distances import Bf16Search

    # 3 rows: one block, 61 padding rows that must never be returned; queries on and off the rows
    # (on a row the certified bound is negative: int16 keys of negative bf16 values must still pass)
    bank = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.0], [10.0, -3.0, 0.0]])
    queries = torch.cat([bank, bank + 0.01, torch.tensor([[1e3, 1e3, 1e3], [-1e3, 0.0, 0.0]])])
    search = Bf16Search(bank)
    assert len(search.augmented) == Bf16Search.BLOCK  # padded to whole blocks
    d, i = search.search(queries, max_bytes=1)  # one query per chunk
    ref_d, ref_i, _ = _float64_nearest(queries, bank)
    assert i[:, 0].tolist() == ref_i.tolist() == [0, 1, 2, 0, 1, 2, 2, 1]
    torch.testing.assert_close(d[:, 0].double(), ref_d, rtol=1e-5, atol=1e-4)


def test_bf16_search_is_exact_where_bf16_products_alone_cannot_tell():
    from patchcore.distances import Bf16Search

    # rows differing by less than bf16 resolves at their scale: the products tie, re-ranking decides
    cluster = torch.full((5, 64), 100.0)
    cluster[:, 0] += torch.tensor([0.30, 0.10, 0.20, 0.05, 0.25])
    bank = torch.cat([cluster, torch.zeros(5, 64)])  # mean 50: centred rows near 50, bf16 step 0.25
    query = torch.full((1, 64), 100.0)
    query[0, 0] += 0.06  # nearest: offset 0.05 (row 3, distance² 0.0001), then 0.10 (row 1, 0.0016)
    centred = (bank - bank.mean(dim=0)).bfloat16()
    assert torch.equal(centred[3], centred[1])  # bf16 products cannot tell rows 3 and 1 apart
    d, i = Bf16Search(bank).search(query)
    assert i.item() == 3 and d.item() == pytest.approx(0.01**2, abs=2e-5)


def test_bank_nn_precision_bf16_equals_float32_and_is_validated():
    from patchcore.errors import ConfigError

    g = torch.Generator().manual_seed(4)
    feats = torch.randn(400, 96, generator=g)
    q = torch.randn(300, 96, generator=g)
    exact = MemoryBank(feats, nn_precision="float32")
    fast = MemoryBank(feats, nn_precision="bfloat16")
    assert fast.uses_bf16() and not exact.uses_bf16() and not fast.uses_bf16(k=3)  # k > 1: float32
    (d1, i1), (d2, i2) = exact.nearest(q), fast.nearest(q)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-4)
    assert fast.nearest(q, k=3)[1].shape == (300, 3)
    with pytest.raises(ConfigError, match="model.nn_precision"):
        MemoryBank(feats, nn_precision="half")


@pytest.mark.slow
def test_bf16_search_equals_float32_search_on_real_tire_embeddings(shared_mvtec):
    from patchcore.config import BackboneConfig, DataConfig, ModelConfig
    from patchcore.data import ImageDataset, make_loader
    from patchcore.data.sources import load_records, model_preprocess
    from patchcore.model import PatchCore

    data = DataConfig(format="mvtec", root=str(shared_mvtec), batch_size=8)
    records = load_records(data, shared_mvtec, "tire")
    train = [r for r in records if r.split == "train"][:16]
    test = [r for r in records if r.split == "test" and r.label == 1][:8]
    backbone = BackboneConfig("efficientnet_lite0", ("layer2", "layer3"), "imagenet")
    for weighting in ("concat", "paper"):  # 152-d and 1024-d embeddings
        model = PatchCore(ModelConfig(backbone=backbone, layer_weighting=weighting), "cpu")
        feats = [model.extract(make_loader(ImageDataset(rs, model_preprocess(data)), 8), progress=False)
                 for rs in (train, test)]
        bank = feats[0][::5]  # every 5th training patch
        (d32, i32), (d16, i16) = (MemoryBank(bank, nn_precision=p).nearest(feats[1]) for p in ("float32", "bfloat16"))
        ref_d, _, gap = _float64_nearest(feats[1], bank)
        clear = gap > 1e-4 * ref_d.clamp(min=1.0)
        assert clear.float().mean() > 0.99
        assert torch.equal(i16[clear], i32[clear])
        torch.testing.assert_close(d16[:, 0].double(), ref_d, rtol=1e-5, atol=1e-3)


def _far_from_origin(seed: int):
    """Rows near a common point far from the origin: ||x||^2 ~ 1e5 against distances ~ 0.6, where
    the expanded form ||q||^2 - 2 q.b + ||b||^2 loses ~1e-2 of each distance in float32."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.full((32,), 60.0)
    return centre + torch.randn(300, 32, generator=g) * 0.1, centre + torch.randn(50, 32, generator=g) * 0.1


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k", [1, 3])
def test_distances_are_exact_where_the_expanded_form_cancels(backend, k):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from patchcore.distances import nearest_neighbours

    feats, queries = _far_from_origin(5)
    all64 = ((queries.double()[:, None] - feats.double()[None]) ** 2).sum(-1)  # (50, 300) float64 truth
    expanded, found = nearest_neighbours(queries, feats, k, squared=True)  # what the products alone give
    products_err = (expanded.double() - all64.gather(1, found)).abs()
    assert (products_err / all64.gather(1, found)).max() > 1e-3  # the case does cancel
    bank = MemoryBank(feats, nn_backend=backend, nn_precision="float32")
    d, i = bank.nearest(queries, k=k)
    assert d.dtype == torch.float32 and d.shape == i.shape == (50, k)
    assert torch.all(d[:, 1:] >= d[:, :-1])  # ascending per query
    assert torch.equal(d, ((queries[:, None] - feats[i]) ** 2).sum(-1))  # the direct form of the rows returned
    truth = all64.gather(1, i)
    assert ((d.double() - truth).abs() / truth).max() < 1e-5
    # which rows are found is as good as the products: within twice their error of the true nearest
    assert (truth[:, 0] - all64.min(1).values <= 2 * products_err.max() + 1e-12).all()


def test_direct_distances_mark_faiss_misses_as_infinite():
    from patchcore.distances import direct_distances

    feats = torch.arange(12.0).view(4, 3)
    queries = torch.zeros(2, 3)
    d, i = direct_distances(queries, feats, torch.tensor([[1, -1], [3, 0]]))
    assert d.tolist() == [[(3 ** 2 + 4 ** 2 + 5 ** 2), float("inf")], [5.0, (9 ** 2 + 10 ** 2 + 11 ** 2)]]
    assert i.tolist() == [[1, -1], [0, 3]]
