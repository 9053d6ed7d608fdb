"""The ``echonode-train`` command line: one sub-command per step of the training workflow."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable


def _commands() -> list[tuple[str, str, str, str]]:
    # (name, help, module, function prefix): modules import torch, so they are
    # imported only for the command that runs.
    return [
        ("synth", "write a synthetic echo archive (DICOM + labels.csv)", "train.synth", "synth"),
        ("index", "preprocess every usable video of an archive into a clip cache", "train.index", "index"),
        ("labels", "LVH / severe-AS labels from the sonographers' measurement SRs", "train.labels", "labels"),
        ("pretrain", "self-supervised pretraining (EchoCLR, MI-SimCLR, SimCLR)", "train.pretrain", "pretrain"),
        ("finetune", "supervised fine-tuning into a model bundle", "train.finetune", "finetune"),
        ("evaluate", "AUROC/AUPRC with bootstrap CIs, ROC/PR plots", "train.evaluate", "evaluate"),
        ("promote", "install a bundle into the node's models folder atomically", "train.promote", "promote"),
        ("predict", "a bundle over clip caches: video and study probabilities (torchrun: one shard per rank)",
         "train.predict", "predict"),
        ("init", "a bundle from torchvision/EchoCLR weights, or random (smoke tests)", "train.init_bundle", "init"),
        ("fetch", "pull echo studies from the PACS (C-MOVE, C-GET or DICOMweb), resumable", "train.fetch.cli", "fetch"),
    ]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echonode-train", description="Train echonode's models from an echo archive.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text, module, prefix in _commands():
        sp = sub.add_parser(name, help=help_text)
        if wanted is None or wanted == name:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{prefix}_arguments")(sp)
            run: Callable[[argparse.Namespace], int] = getattr(mod, f"run_{prefix}")
            sp.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``echonode-train`` and ``python -m train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
