"""report.md for a compare run: what was compared, the numbers, the pictures, what was missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from experiments.reports import format_table
from patchcore.memory_bank import atomic_write_bytes


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def write_report(path: Path, config: Any, plan: Any, rows: list[dict[str, Any]], uploads: list[dict[str, Any]],
                 federation: dict[str, Any], timings: dict[str, float], figures: list[Path]) -> Path:
    f = config.federation
    lines = [
        "# fedpatch compare report\n",
        f"Backbone `{config.model.backbone.name}` ({config.model.backbone.weights}), layers "
        f"{', '.join(config.model.backbone.layers)}; coreset {config.model.coreset.ratio:g} "
        f"({config.model.coreset.method}); seed {config.seed}.\n",
        f"{f.num_factories} factories, partition `{f.partition}`"
        + (f" (alpha {f.alpha:g})" if f.partition == "dirichlet" else "")
        + f", domain shift {'on' if f.domain_shift else 'off'}; local ratio {f.local:g}, global ratio "
        f"{f.global_ratio:g}, aggregation `{f.aggregation}`, payload {f.payload_dtype}.\n",
        "All methods are scored on the same test images (the union of the factories' test sets); "
        "local-only models are scored on their own factory's test images and averaged.\n",
        "## Detection quality\n",
        _table(rows, ("category", "method", "image_auroc", "pixel_auroc", "aupro",
                      *(("auc_spro_0.05",) if any("auc_spro_0.05" in r for r in rows) else ()),
                      "f1_max", "bank_size", "coverage_radius")),
        "\nCoverage radius: the largest distance from any training patch of the union to its nearest bank "
        "feature (lower is better; what greedy k-center minimises).\n",
    ]
    if uploads:
        lines += ["## Communication\n", _table(uploads, ("factory", "bytes_sent", "raw_feature_bytes", "upload_ratio", "vectors_sent"))]
    missing = federation.get("missing") or federation.get("failed") or []
    lines += ["\n## Federation health\n", f"Missing or failed factories: {missing if missing else 'none'}.\n"]
    lines += ["## Wall time per phase (s)\n", "```\n" + format_table([timings], list(timings)) + "\n```\n"]
    lines += ["## Figures\n"] + [f"![{p.stem}]({p.name})\n" for p in figures]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
