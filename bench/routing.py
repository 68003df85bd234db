"""Routing study: which initialisation and temperature make converted layers route?

The protocol of the routing issue's target, run through ``dynify.train.finetune`` exactly
as ``dynify finetune test_resnet --data .../train.tar --train-images 6400 --epochs 2
--img-size 32`` runs it (timm's augmentation, SGD, cosine LR, batch 128): a static timm
``test_resnet`` (random init, seeded) is converted with the ``dycnn`` recipe under each
variant below, trained, and its routing is measured after every epoch on 512 held-out
training images (``dynify.routing_report``): the model's routing effect (logit change with
every attention frozen at its mean), flipped predictions, attention entropy, per-sample
spread and expert spread.

One result file per run in ``--output`` (skipped when present, so a stopped study resumes).

    python bench/routing.py                      # about 10 minutes here
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch

import dynify
from dynify.schedule import TemperatureSchedule
from dynify.train import FinetuneSettings, finetune

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar"

# name -> (init, routing_std or None, temperature schedule)
VARIANTS: dict[str, tuple[str, float | None, TemperatureSchedule]] = {
    "perturb T30->1": ("perturb", None, TemperatureSchedule(start=30, end=1, length=10)),
    "perturb T1": ("perturb", None, TemperatureSchedule.constant(1)),
    "upcycle std0.3 T1": ("upcycle", 0.3, TemperatureSchedule.constant(1)),
    "upcycle std1 T1": ("upcycle", 1.0, TemperatureSchedule.constant(1)),
    "upcycle std3 T1": ("upcycle", 3.0, TemperatureSchedule.constant(1)),
    "upcycle std1 T30->1": ("upcycle", 1.0, TemperatureSchedule(start=30, end=1, length=10)),
    "upcycle std1 T10->1/2ep": ("upcycle", 1.0, TemperatureSchedule(start=10, end=1, length=2)),
    # What the search spaces now sample (start 1 or 5, to 1 over 1 epoch).
    "upcycle std1 T5->1/1ep": ("upcycle", 1.0, TemperatureSchedule(start=5, end=1, length=1)),
    "upcycle std1 T5->1/1ep cos": (
        "upcycle",
        1.0,
        TemperatureSchedule(start=5, end=1, length=1, shape="cosine"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=6400)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "routing"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            init, std, schedule = VARIANTS[name]
            path = out / f"{name.replace(' ', '_').replace('>', '').replace('/', '-')}_s{seed}.json"
            if path.exists():
                continue
            torch.manual_seed(seed)
            model = timm.create_model("test_resnet", num_classes=10)
            recipe = dynify.load_recipe("dycnn").to_dict()
            recipe["defaults"]["init"] = init
            recipe["defaults"]["temperature"] = schedule.to_dict()
            if std is not None:
                recipe["defaults"]["routing_std"] = std
            model = dynify.apply(model, recipe, input_size=(3, 32, 32), seed=seed)
            t0 = time.perf_counter()
            settings = FinetuneSettings(
                data=args.data,
                epochs=args.epochs,
                train_images=args.train_images,
                val_images=512,
                img_size=32,
                seed=seed,
                workers=0,
                progress=False,
                routing_images=512,
            )
            result = finetune(model, settings)
            record = {
                "variant": name,
                "seed": seed,
                "seconds": time.perf_counter() - t0,
                "history": result.history,
            }
            path.write_text(json.dumps(record, indent=1) + "\n")
            last = result.history[-1]
            r = last["routing"]
            print(
                f"{name:28s} seed {seed}: top-1 {last['val_top1']:.1f}  effect "
                f"{100 * r['effect']:.2f}%  flips {100 * r['flips']:.1f}%  entropy "
                f"{r['entropy']:.3f}  sample spread {r['sample_spread']:.3f}  expert spread "
                f"{r['expert_spread']:.4f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
