"""Training data: what ``--data`` names, read with timm's and torchvision's datasets.

``--data`` may be an ImageFolder folder (class sub-folders), a folder holding ``train`` and
``val`` (or ``validation`` / ``test``) folders or ``.tar`` files of them, one ``.tar`` of an
ImageFolder, or a torchvision dataset name (``torch/cifar10``, downloaded into a cache folder
when missing). Reading is timm's ``create_dataset`` (folders and tars) or torchvision's classes
through it; transforms are timm's ``create_transform`` with the model's ``pretrained_cfg``.

The loaders make a run reproducible and independent of how it is split across processes:
the order of an epoch depends only on (seed, epoch) (a ``DistributedSampler`` even with one
process), and each image's augmentation is drawn from a generator seeded by (seed, epoch,
image index). So a resumed run sees exactly the images an uninterrupted one would, and a run
on N processes sees the same global batches as one process.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dynify.errors import DynifyError, shorten

__all__ = [
    "TORCH_DATASETS",
    "Data",
    "Loaders",
    "data_config",
    "default_cache_dir",
    "eval_loader",
    "load_data",
    "make_loaders",
]

# torchvision datasets timm's create_dataset can build (its ``torch/`` prefix).
TORCH_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist")
TRAIN_NAMES: tuple[str, ...] = ("train", "training")
VAL_NAMES: tuple[str, ...] = ("val", "validation", "valid", "test")
ACCEPTED = (
    "an ImageFolder folder, a folder with train/ and val/ (or test/) folders or .tar files, "
    "an ImageFolder .tar, or a torchvision name ("
    + ", ".join(f"torch/{name}" for name in TORCH_DATASETS)
    + ")"
)


def default_cache_dir() -> Path:
    """Where ``torch/NAME`` datasets are downloaded: ``$DYNIFY_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/dynify/datasets`` (``~/.cache/dynify/datasets``)."""
    if os.environ.get("DYNIFY_DATA_CACHE"):
        return Path(os.environ["DYNIFY_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynify" / "datasets"


@dataclass
class Data:
    """A training and a validation set of (PIL image, class index) pairs, untransformed."""

    train: Dataset
    val: Dataset
    classes: list[str]
    source: str
    val_source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train):,} training images (val: {self.val_source}, "
            f"{len(self.val):,}), {self.num_classes} classes"
        )


def load_data(
    spec: str | os.PathLike[str] | Data,
    *,
    holdout: float = 0.1,
    train_images: int | None = None,
    val_images: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    split_seed: int = 0,
) -> Data:
    """Resolve ``data`` (``dynify finetune --data``) to a :class:`Data`.

    Args:
        spec: see the module documentation; a :class:`Data` is passed through (subsets
            still apply), so a search can read a dataset once for all its trials.
        holdout: fraction of the images held out for validation when ``spec`` has no
            validation split (a single ImageFolder or tar); fixed by ``split_seed``.
        train_images, val_images: use only this many images (a fixed random subset, the same
            for every seed, so runs with different seeds train on the same images).
        cache_dir: where ``torch/NAME`` is downloaded (default :func:`default_cache_dir`).
        download: allow downloading ``torch/NAME``.
        split_seed: seed of the held-out split and of the subsets.
    """
    if isinstance(spec, Data):
        data = spec
    else:
        text = os.fspath(spec)
        if text.lower().startswith("torch/"):
            data = _torch_dataset(text, cache_dir=cache_dir, download=download)
        else:
            data = _path_dataset(Path(text), holdout=holdout, split_seed=split_seed)
    if len(data.train) == 0:
        raise DynifyError(f"data {data.source!r}: no training images found ({ACCEPTED})")
    train = _subset(data.train, train_images, "train_images", split_seed)
    val = _subset(data.val, val_images, "val_images", split_seed + 1)
    if train is data.train and val is data.val:
        return data
    return Data(train, val, data.classes, data.source, data.val_source)


def sample_images(ds: Dataset, n: int, *, seed: int = 0) -> Dataset:
    """A fixed random subset of ``min(n, len(ds))`` images (a class-ordered folder's first
    ``n`` images would all be of one class)."""
    return _subset(ds, min(n, len(ds)), "images", seed)


def _subset(ds: Dataset, n: int | None, what: str, seed: int) -> Dataset:
    if n is None or n == len(ds):
        return ds
    named = (what,) if what in ("train_images", "val_images") else ()
    if n < 1:
        raise DynifyError(f"{what} must be >= 1, got {n}", arguments=named)
    if n > len(ds):
        raise DynifyError(
            f"{what}={n:,} is more than the {len(ds):,} images available", arguments=named
        )
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, sorted(order[:n].tolist()))


def _torch_dataset(text: str, *, cache_dir: str | os.PathLike[str] | None, download: bool) -> Data:
    from timm.data import create_dataset

    name = text.split("/", 1)[1].lower()
    if name not in TORCH_DATASETS:
        raise DynifyError(
            f"data {text!r}: unknown torchvision dataset; accepted: "
            + ", ".join(f"torch/{n}" for n in TORCH_DATASETS)
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        # One download per machine: processes started together (torchrun) wait for it.
        with _file_lock(root / ".download.lock"):
            train = create_dataset(
                f"torch/{name}", root=str(root), split="train", download=download
            )
            val = create_dataset(
                f"torch/{name}", root=str(root), split="validation", download=download
            )
    except (OSError, RuntimeError) as err:
        reason = shorten(str(err), 160) or type(err).__name__
        how = "could not download" if download else "not found in"
        raise DynifyError(
            f"data {text!r}: {how} {name} into {str(root)!r} ({reason}); offline, copy the "
            f"dataset there or pass a folder or .tar instead"
        ) from err
    return Data(train, val, list(train.classes), text, f"{text} test split")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _path_dataset(path: Path, *, holdout: float, split_seed: int) -> Data:
    if not path.exists():
        raise DynifyError(f"data {str(path)!r}: no such file or folder; expected {ACCEPTED}")
    if path.is_file():
        if path.suffix != ".tar":
            raise DynifyError(
                f"data {str(path)!r}: not a folder or a .tar file; expected {ACCEPTED}"
            )
        return _held_out(_image_dataset(path), str(path), holdout, split_seed)
    train_path = _find_split(path, TRAIN_NAMES)
    if train_path is None:
        return _held_out(_image_dataset(path), str(path), holdout, split_seed)
    val_path = _find_split(path, VAL_NAMES)
    train = _image_dataset(train_path)
    if val_path is None:
        return _held_out(train, str(train_path), holdout, split_seed)
    val = _image_dataset(val_path)
    classes, val_classes = _classes(train), _classes(val)
    if classes != val_classes:
        extra = sorted(set(val_classes) - set(classes)) or sorted(set(classes) - set(val_classes))
        raise DynifyError(
            f"data {str(path)!r}: {train_path.name} and {val_path.name} have different classes "
            f"({len(classes)} vs {len(val_classes)}, e.g. {extra[:1]}); both splits need the "
            f"same class folders"
        )
    return Data(train, val, classes, str(train_path), str(val_path))


def _find_split(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (root / name, root / f"{name}.tar"):
            if candidate.exists():
                return candidate
    return None


def _image_dataset(path: Path) -> Dataset:
    from timm.data import create_dataset

    try:
        ds = create_dataset("", root=str(path), search_split=False)
    except Exception as err:  # timm's readers raise assorted errors on unreadable input
        raise DynifyError(
            f"data {str(path)!r} could not be read ({type(err).__name__}: "
            f"{shorten(str(err), 120)}); expected {ACCEPTED}"
        ) from err
    if len(ds) == 0:
        raise DynifyError(
            f"data {str(path)!r}: no images found (expected class sub-folders of .jpg/.png "
            f"files); accepted: {ACCEPTED}"
        )
    return ds


def _classes(ds: Any) -> list[str]:
    """Class names in index order, from a timm ImageDataset or a torchvision dataset."""
    if isinstance(ds, Subset):
        return _classes(ds.dataset)
    reader = getattr(ds, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)
    if mapping is None:
        mapping = getattr(ds, "class_to_idx", None)
    if mapping:
        return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    return list(getattr(ds, "classes", []))


def _held_out(ds: Dataset, source: str, holdout: float, seed: int) -> Data:
    if not 0 < holdout < 1:
        raise DynifyError(
            f"data {source!r} has no validation split and holdout={holdout} is not in (0, 1); "
            f"give a fraction to hold out, or a folder with train/ and val/"
        )
    n = len(ds)
    n_val = max(1, round(n * holdout))
    if n_val >= n:
        raise DynifyError(f"data {source!r}: {n} images are too few to hold out {holdout:.0%}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    return Data(Subset(ds, train), Subset(ds, val), _classes(ds), source, f"{holdout:.0%} held out")


# -- transforms and loaders -------------------------------------------------------------------


class _Transformed(Dataset):
    """``base`` with ``transform`` applied; augmentation drawn from a per-image seed."""

    def __init__(self, base: Dataset, transform: Any, *, seed: int | None) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.base[index][:2]
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        if self.seed is None:
            return self.transform(img), int(target)
        with _seeded(derive_seed(self.seed, self.epoch, index)):
            return self.transform(img), int(target)


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (stable across runs and processes)."""
    value = 0x5EED
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python's and torch's CPU generators (what transforms draw from), then restore
    them, so the caller's random streams (dropout, ...) are left as they were."""
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    data_config: dict[str, Any]

    def set_epoch(self, epoch: int) -> None:
        """Fix the order and the augmentation of ``epoch`` (call before iterating)."""
        self.train.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        self.train.dataset.epoch = epoch  # type: ignore[attr-defined]


def data_config(
    model: torch.nn.Module, *, img_size: int | None = None, crop_pct: float | None = None
) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model``: input size, interpolation, mean, std and
    crop from its ``pretrained_cfg``. ``img_size`` overrides the size, and then the whole
    image is used (``crop_pct`` 1) unless ``crop_pct`` is given."""
    from timm.data import resolve_data_config

    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["input_size"] = (3, int(img_size), int(img_size))
        overrides["crop_pct"] = 1.0 if crop_pct is None else crop_pct
    elif crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    return dict(resolve_data_config(overrides, model=model))


def _common(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std")
    return {k: cfg[k] for k in keys}


def eval_loader(
    dataset: Dataset,
    *,
    cfg: dict[str, Any],
    batch_size: int,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Loader of this process's share of ``dataset`` (every ``world_size``-th image), with
    timm's evaluation transform; per-process counts are summed, so results are exact for any
    number of processes."""
    from timm.data import create_transform

    tf = create_transform(
        is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], **_common(cfg)
    )
    ds = _Transformed(dataset, tf, seed=None)
    shard = Subset(ds, range(rank, len(ds), world_size))
    return DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory
    )


def make_loaders(
    data: Data,
    *,
    model: torch.nn.Module,
    batch_size: int,
    img_size: int | None = None,
    crop_pct: float | None = None,
    augment: bool = True,
    aug_scale: tuple[float, float] | None = None,
    seed: int = 0,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Loaders:
    """Training and validation loaders for one process of ``world_size``.

    ``batch_size`` is per process; see :func:`data_config` for sizes and normalisation.
    """
    from timm.data import create_transform

    cfg = data_config(model, img_size=img_size, crop_pct=crop_pct)
    if augment:
        train_tf = create_transform(is_training=True, scale=aug_scale, **_common(cfg))
    else:
        train_tf = create_transform(
            is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], **_common(cfg)
        )
    train_ds = _Transformed(data.train, train_tf, seed=seed if augment else None)
    if len(train_ds) < batch_size * world_size:
        raise DynifyError(
            f"batch_size {batch_size * world_size} is larger than the {len(train_ds):,} "
            f"training images; lower batch_size",
            arguments=("batch_size",),
        )
    sampler = DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    val = eval_loader(
        data.val,
        cfg=cfg,
        batch_size=batch_size,
        workers=workers,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )
    return Loaders(train, val, cfg)
