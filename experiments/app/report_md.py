"""report.md for a compare run: what was compared, the numbers, the pictures, what was missing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments.app.reports import format_table
from patchcore.memory_bank import atomic_write_bytes


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


PARITY = 0.02  # federated within this much image AUROC of centralized: "on par"
LOCAL_GAP = 0.05  # local-only at least this much below federated: "federation pays"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _image_aurocs(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{category: {"centralized" | "federated" | "local": image AUROC}}, finite values only."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        method = "local" if str(r.get("method", "")).startswith("local") else r.get("method")
        value = _number(r.get("image_auroc"))
        if method in ("centralized", "federated", "local") and value is not None:
            out.setdefault(str(r.get("category")), {})[method] = value
    return out


def finding(rows: Sequence[dict[str, Any]]) -> str:
    """The report's first paragraph: federated vs centralized vs local-only image AUROC in words,
    computed from the rows, saying plainly which of the two margins (federated within PARITY of
    centralized; local-only at least LOCAL_GAP below federated) hold and which do not."""
    per = _image_aurocs(rows)
    cats = [c for c, m in per.items() if "centralized" in m and "federated" in m]
    if not cats:
        return ("**Finding.** No category has both a centralized and a federated image AUROC, so "
                "this run cannot say how federation compares.")
    mean = {k: float(np.mean([per[c][k] for c in cats])) for k in ("centralized", "federated")}
    c, f = mean["centralized"], mean["federated"]
    scope = f"mean over {len(cats)} categories" if len(cats) > 1 else cats[0]
    diff = f - c
    if abs(diff) <= PARITY:
        text = (f"**Finding.** Federated image AUROC {f:.3f} is within {abs(diff):.3f} of centralized {c:.3f} "
                f"({scope}): pooling the factories' coresets matches pooling their images")
    else:
        text = (f"**Finding.** Federated image AUROC {f:.3f} is {abs(diff):.3f} {'below' if diff < 0 else 'above'} "
                f"centralized {c:.3f} ({scope}), outside the {PARITY:g} parity margin: here the "
                f"coreset of coresets does not match the pooled images")
    local_cats = [k for k in cats if "local" in per[k]]
    if not local_cats:
        text += ". Local-only models were not scored, so the run does not show what federation buys."
    else:
        lf = float(np.mean([per[k]["federated"] for k in local_cats]))
        lm = float(np.mean([per[k]["local"] for k in local_cats]))
        gap = lf - lm
        scope = "" if local_cats == cats else f" (over {', '.join(local_cats)})"
        if gap >= LOCAL_GAP:
            text += (f"; local-only models average {lm:.3f}{scope}, {gap:.3f} below federated: a "
                     f"factory alone has seen only its own share of the normal variation, so normal "
                     f"parts it never saw look anomalous, while the federated bank covers every "
                     f"factory's normal images.")
        elif gap >= 0:
            text += (f"; local-only models average {lm:.3f}{scope}, only {gap:.3f} below federated "
                     f"(less than {LOCAL_GAP:g}): on this data one factory's images already cover "
                     f"most normal variation, so federation buys little detection quality.")
        else:
            text += (f"; local-only models average {lm:.3f}{scope}, {-gap:.3f} above federated: on "
                     f"this data a factory does better alone, so federation buys no detection "
                     f"quality.")
    parts = [f"{k} {per[k]['centralized']:.3f} / {per[k]['federated']:.3f}"
             + (f" / {per[k]['local']:.3f}" if "local" in per[k] else "") for k in cats]
    text += (" Per category (centralized / federated" + (" / local" if local_cats else "") + "): "
             + "; ".join(parts) + ".")
    missed = [k for k in cats if abs(per[k]["federated"] - per[k]["centralized"]) > PARITY
              or ("local" in per[k] and per[k]["federated"] - per[k]["local"] < LOCAL_GAP)]
    if missed and abs(diff) <= PARITY and local_cats and gap >= LOCAL_GAP:
        text += (f" Not every category meets both margins (parity {PARITY:g}, local gap "
                 f"{LOCAL_GAP:g}): {', '.join(missed)} {'does' if len(missed) == 1 else 'do'} not.")
    return text + "\n"


def write_report(path: Path, config: Any, plan: Any, rows: list[dict[str, Any]], uploads: list[dict[str, Any]],
                 federation: dict[str, Any], timings: dict[str, float], figures: list[Path]) -> Path:
    f = config.federation
    lines = [
        "# fedpatch compare report\n",
        finding(rows),
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
        lines += ["## Communication\n",
                  _table(uploads, ("factory", "bytes_sent", "raw_feature_bytes", "upload_ratio", "vectors_sent"))]
    missing = federation.get("missing") or federation.get("failed") or []
    lines += ["\n## Federation health\n", f"Missing or failed factories: {missing if missing else 'none'}.\n"]
    lines += ["## Wall time per phase (s)\n", "```\n" + format_table([timings], list(timings)) + "\n```\n"]
    lines += ["## Figures\n"] + [f"![{p.stem}]({p.name})\n" for p in figures]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
