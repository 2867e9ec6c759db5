"""`fedpatch study NAME`: the research questions, one command each (see runner.py).

Kept free of heavy imports: the command line checks the study name and config before torch loads.
"""

STUDIES = {
    "parity": "federated vs centralized vs each factory alone (any dataset: AutoVI too)",
    "shift": "clean -> shifted: no adaptation, re-calibrated threshold, re-fit; "
             "severities, families, some factories shifted",
    "unified": "one bank for all categories vs one per category; cross-category scores",
    "factories": "1-32 factories at equal total data and at equal data per factory",
    "ratio": "local and global coreset ratios: AUROC and coverage radius vs bank size",
    "backbones": "every backbone whose weights are at hand, same protocol",
    "padim": "PaDiM (per-position Gaussian, exact federated form) vs PatchCore, bytes included",
    "clipping": "clipping patch embeddings at quantiles of their norms, PatchCore and PaDiM",
    "dp_padim": "DP-PaDiM: (ε, δ)-DP per training image at ε 1/4/8, vs PaDiM and PatchCore (federated, centralized)",
}
