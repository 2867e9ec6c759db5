"""The benchmark scripts' own logic: their baselines compute what they claim, their tables add up."""

import json

import numpy as np
import torch


def test_embedding_bench_dense_baseline_is_the_same_embedding():
    from experiments.bench.embedding import embed_dense, embed_grouped
    from patchcore.features import embed_by_convolution, embed_by_patches

    torch.manual_seed(2)
    maps = [torch.randn(2, 24, 8, 8), torch.randn(2, 56, 4, 4)]
    dense, grid = embed_dense(maps, 3, 64, 48)
    grouped, grid_g = embed_by_convolution(maps, 3, 64, 48)
    patches, _ = embed_by_patches(maps, 3, 64, 48)
    assert grid == grid_g == (8, 8) and dense.shape == (2, 64, 48)
    torch.testing.assert_close(dense, grouped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense, patches, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embed_grouped(maps, 3, 64, 48)[0], patches, rtol=1e-5, atol=1e-6)


def test_coreset_bench_reports_medians_over_seeds(tmp_path, capsys):
    from experiments.bench import coreset as bench
    from patchcore.coreset import coverage_radius, greedy_coreset

    x = torch.randn(600, 48, generator=torch.Generator().manual_seed(0))
    npy = tmp_path / "feats.npy"
    np.save(npy, x.numpy())
    out = tmp_path / "result.json"
    assert bench.main(["--features", str(npy), "--seeds", "0", "1", "2", "--variants", "32:float32",
                       "32:float32:off", "none:float32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 600 and result["picks"] == 60
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ours p32 float32", "ours p32 float32 plain", "ours pNone float32"}
    expected = [coverage_radius(x[greedy_coreset(x, 60, projection_dim=32, seed=s)], x) for s in (0, 1, 2)]
    row = rows["ours p32 float32"]
    assert row["per_seed_radius"] == expected and row["coverage_radius"] == sorted(expected)[1]
    assert rows["ours p32 float32 plain"]["per_seed_radius"] == expected  # the plain loop: same picks
    assert row["seconds"] == sorted(row["per_seed_seconds"])[1]
    printed = capsys.readouterr().out
    assert "radius per seed" in printed and "pruned picks == plain picks, p32 float32: 3/3 seeds" in printed
    assert bench.parse_variant("256:bfloat16") == (256, "bfloat16", "auto")
    assert bench.parse_variant("none") == (None, "float32", "auto")
    assert bench.parse_variant("128:float32:off") == (128, "float32", "off")
