"""Privacy audit: what a curious server can learn from what a factory uploads, measured.

- `releases`: what the server receives per payload setting (a registry of builders that run the
  site's own code path: transform, local coreset, make_payload, the train reply's records,
  server-side decoding), with audit-only bookkeeping of which image row each vector came from;
- `attacks`: inversion (decoders from embeddings to pixels trained on the attacker's own
  images), membership (nearest-release distances, Mahalanobis for Gaussian releases),
  attribution (which factory sent a vector);
- `measures`: PSNR, SSIM (scikit-image's defaults, implemented here), AUROC, TPR at low FPR,
  bootstrap intervals.

The command is `fedpatch audit` (experiments/app/audit.py); findings on the shared real images:
experiments/studies/privacy_audit.md.
"""

from federated.audit.attacks import (
    attribution_attack,
    fit_mlp,
    fit_ridge,
    inversion_scores,
    nearest_scores,
    patch_windows,
)
from federated.audit.measures import auroc, auroc_ci, psnr, ssim, tpr_at_fpr
from federated.audit.releases import (
    BUILDERS,
    FactoryData,
    Release,
    Setting,
    build_release,
    default_settings,
    register_release,
)

__all__ = ["BUILDERS", "FactoryData", "Release", "Setting", "attribution_attack", "auroc", "auroc_ci",
           "build_release", "default_settings", "fit_mlp", "fit_ridge", "inversion_scores",
           "nearest_scores", "patch_windows", "psnr", "register_release", "ssim", "tpr_at_fpr"]
