"""Train an image embedding network with a fastap loss, against a triplet-loss baseline.

By default: scikit-learn's handwritten digits (1797 grey 8x8 images, shipped with scikit-learn,
no download). The network trains on digits 0-5 and is evaluated on digits 6-9, classes it never
saw: exact held-out mAP and recall@1 (fastap.metrics.retrieval_metrics, each held-out image a
query against all the others), before training and after every epoch. Each loss in --loss runs
the same schedule from the same initial weights on the same batches with the same optimizer.

Writes into --out (default out/train): curves.png (loss, held-out mAP and R@1 against epochs),
report.md (settings, the results table, per-epoch values) and one checkpoint per loss
(checkpoint-<loss>.pt, after every epoch). Started again with the same --out, a run resumes
where it stopped; a finished loss is not trained again (--restart ignores the checkpoints).

    python examples/train.py                              # fastap, then the triplet baseline
    python examples/train.py --loss fastap,tie_aware,fastap_xbm,triplet --epochs 10
    python examples/train.py --data CUB_200_2011/images --image-size 64 --batch-size 2048 \\
        --chunk-size 256 --device cuda

--data DIR: an ImageFolder-style directory (one sub-folder of images per class). The classes
are split in half by sorted name: the first half trains, the second is held out (for
CUB-200-2011 that is the standard 100/100 split). Needs pillow.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastap
import fastap.metrics
from fastap.memory import CrossBatchMemory
from fastap.train import multistage_backward

LOSSES = ("fastap", "tie_aware", "fastap_xbm", "triplet")
LOSS_TITLES = {
    "fastap": "APLoss (AP_Q)",
    "tie_aware": "APLoss (tie-aware AP_T)",
    "fastap_xbm": "APLoss (AP_Q) + CrossBatchMemory",
    "triplet": "triplet, batch-hard (baseline)",
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class Dataset:
    """Images kept in memory as a tensor [N, C, H, W] (float in [0, 1], or uint8), labels [N]
    (int64), the names of the classes, and the mean / std used to standardise the pixels."""

    def __init__(self, images, labels, class_names, mean, std):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: torch.Tensor) -> Dataset:
        return Dataset(self.images[mask], self.labels[mask], self.class_names, self.mean, self.std)

    def pixels(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Float images in [0, 1] (not yet standardised)."""
        x = self.images[index]
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)


def load_digits() -> tuple[Dataset, Dataset, str]:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [N, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    names = [str(d) for d in range(10)]
    train = labels <= 5
    mean = images[train].mean().reshape(1, 1, 1)
    std = images[train].std().reshape(1, 1, 1)
    full = Dataset(images, labels, names, mean, std)
    train_set, held_out = full.subset(train), full.subset(~train)
    description = (
        f"scikit-learn digits (8x8 grey): {len(train_set)} training images of classes 0-5, "
        f"{len(held_out)} held-out images of classes 6-9"
    )
    return train_set, held_out, description


def load_folder(root: Path, size: int, cache_dir: Path) -> tuple[Dataset, Dataset, str]:
    """An ImageFolder-style directory: root/<class>/<image>. Images are resized (shorter side to
    `size`, then centre-cropped to size x size, RGB) and cached as uint8 in cache_dir."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(index)
    # Classes by their images: the first half of those with images trains, the rest is held out.
    counted = sorted(set(labels))
    if len(counted) < 4:
        raise SystemExit(
            f"--data {root}: need at least 4 class sub-folders with images, found {len(counted)}"
        )
    classes = [classes[index] for index in counted]
    labels = [counted.index(label) for label in labels]
    key = hashlib.sha1(
        "\n".join([str(root.resolve()), str(size), *map(str, files)]).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"data-cache-{key}.pt"
    if cache.exists():
        images = torch.load(cache, weights_only=True)
        print(f"data: {len(files)} images from the cache {cache}")
    else:
        try:
            from PIL import Image
        except ImportError:
            raise SystemExit("--data needs pillow: pip install pillow") from None

        images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
        progress = Progress(len(files), "loading images")
        for i, path in enumerate(files):
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = size / min(image.size)
                w, h = (max(size, round(s * scale)) for s in image.size)
                image = image.resize((w, h), Image.BILINEAR)
                left, top = (w - size) // 2, (h - size) // 2
                image = image.crop((left, top, left + size, top + size))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            images[i] = pixels.view(size, size, 3).permute(2, 0, 1)
            progress.update()
        progress.close()
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(images, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
    labels = torch.tensor(labels, dtype=torch.int64)
    half = len(classes) // 2
    train = labels < half
    sample = images[train][:: max(1, int(train.sum()) // 2000)].float() / 255
    mean = sample.mean(dim=(0, 2, 3)).reshape(3, 1, 1)
    std = sample.std(dim=(0, 2, 3)).reshape(3, 1, 1).clamp_min(1e-3)
    full = Dataset(images, labels, classes, mean, std)
    train_set, held_out = full.subset(train), full.subset(~train)
    description = (
        f"{root} ({size}x{size} RGB): {len(train_set)} training images of {half} classes "
        f"({classes[0]} .. {classes[half - 1]}), {len(held_out)} held-out images of "
        f"{len(classes) - half} classes ({classes[half]} .. {classes[-1]})"
    )
    return train_set, held_out, description


def class_groups(labels: torch.Tensor) -> list[torch.Tensor]:
    """The indices of each class's samples."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels[order] - labels.min())
    return [group for group in order.split(counts.tolist()) if len(group)]


def epoch_batches(
    groups: list[torch.Tensor], batch_size: int, per_class: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of batches, each sample once: every class shuffled and cut into runs of
    `per_class` samples, the runs shuffled and concatenated, then cut into batches (so a batch
    holds about batch_size / per_class classes, each with several positives). A last batch of
    less than half batch_size is dropped."""
    runs = []
    for group in groups:
        runs.extend(group[torch.randperm(len(group), generator=generator)].split(per_class))
    order = torch.randperm(len(runs), generator=generator).tolist()
    batches = list(torch.cat([runs[i] for i in order]).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size / 2:
        batches.pop()
    return batches


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image [B, C, H, W] by up to max_shift pixels in each direction (edges
    replicated)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate").permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (dx + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# model and losses
# --------------------------------------------------------------------------------------------


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[torch.nn.Module]:
    return [
        torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        torch.nn.BatchNorm2d(c_out),
        torch.nn.ReLU(inplace=True),
    ]


def make_model(in_channels: int, image_size: int, dim: int) -> torch.nn.Module:
    """A small CNN: stride-2 stages down to 8x8 or less (none for the 8x8 digits), two 3x3
    convolutions, max-pooling, a third, global average pooling and a linear head to `dim`."""
    layers, channels, size = [], in_channels, image_size
    while size > 8:
        layers += conv_bn_relu(channels, 32, stride=2)
        channels, size = 32, (size + 1) // 2
    layers += conv_bn_relu(channels, 32) + conv_bn_relu(32, 64)
    layers += [torch.nn.MaxPool2d(2, ceil_mode=True), *conv_bn_relu(64, 128)]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, dim)]
    return torch.nn.Sequential(*layers)


class BatchHardTriplet(torch.nn.Module):
    """The baseline: triplet loss with in-batch mining (Hermans et al. 2017, "batch hard"): each
    anchor with its farthest positive and its closest negative, on L2-normalised embeddings,
    mean of max(0, d(a, p) - d(a, n) + margin) over the anchors that have both."""

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = F.normalize(embeddings, dim=1)
        with torch.no_grad():  # mining on the current distances
            cosine = e @ e.T
            same = labels[:, None] == labels[None, :]
            own = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            positive = same & ~own
            hardest_positive = cosine.masked_fill(~positive, math.inf).argmin(dim=1)
            hardest_negative = cosine.masked_fill(same, -math.inf).argmax(dim=1)
            valid = positive.any(dim=1) & (~same).any(dim=1)
        if not bool(valid.any()):
            return embeddings.sum() * 0
        anchors = e[valid]
        return F.triplet_margin_loss(
            anchors,
            e[hardest_positive[valid]],
            e[hardest_negative[valid]],
            margin=self.margin,
        )


def make_loss(name: str, args) -> torch.nn.Module:
    if name == "fastap":
        return fastap.APLoss(num_bins=args.num_bins)
    if name == "tie_aware":
        return fastap.APLoss(num_bins=args.num_bins, variant="tie_aware")
    if name == "fastap_xbm":
        return CrossBatchMemory(fastap.APLoss(num_bins=args.num_bins), size=args.memory_size)
    if name == "triplet":
        return BatchHardTriplet(margin=args.margin)
    raise ValueError(name)


# --------------------------------------------------------------------------------------------
# progress, evaluation, checkpoints
# --------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn in place; silent when stderr is not a
    terminal (the per-epoch lines on stdout say everything that matters)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start = total, label, 0, time.perf_counter()
        self.enabled = sys.stderr.isatty()
        self.last_draw = 0.0

    def update(self, note: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.1 or self.done == self.total):
            self.last_draw = now
            filled = int(24 * self.done / max(1, self.total))
            bar = "#" * filled + "." * (24 - filled)
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(
                f"\r{self.label} [{bar}] {self.done}/{self.total} {rate:.1f} it/s {note}\033[K"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@torch.no_grad()
def embed(model: torch.nn.Module, data: Dataset, chunk_size: int, device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = [
        model(data.standardise(data.pixels(slice(lo, lo + chunk_size))).to(device)).float()
        for lo in range(0, len(data), chunk_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model, held_out: Dataset, args) -> dict[str, float]:
    """Exact mAP and recall@1 of the held-out set against itself (cosine similarity, each
    image's own entry excluded)."""
    embeddings = embed(model, held_out, args.chunk_size, args.device)
    result = fastap.metrics.retrieval_metrics(
        embeddings, labels=held_out.labels.to(embeddings.device), ks=(1,), metrics=("map", "recall")
    )
    return {"map": result["map"], "recall@1": result["recall@1"]}


def pixel_reference(held_out: Dataset) -> dict[str, float] | None:
    """mAP and recall@1 of the standardised raw pixels (no network), for scale; None when that
    would take long (more than ~5e10 multiply-adds)."""
    pixels = held_out.images[0].numel()
    if len(held_out) ** 2 * pixels > 5e10:
        return None
    flat = held_out.standardise(held_out.pixels(slice(None))).flatten(1)
    result = fastap.metrics.retrieval_metrics(
        flat, labels=held_out.labels, ks=(1,), metrics=("map", "recall")
    )
    return {"map": result["map"], "recall@1": result["recall@1"]}


def rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    # (torch.load's map_location moved the saved states to the device; torch takes them on the
    # CPU, as ByteTensors)
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file first, so that an interruption never leaves half a file."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def run_config(args, name: str) -> dict:
    """What a checkpoint must agree with to be resumed (--epochs may grow)."""
    return {
        "loss": name,
        "data": str(Path(args.data).resolve()) if args.data else "digits",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "samples_per_class": args.samples_per_class,
        "lr": args.lr,
        "seed": args.seed,
        "num_bins": args.num_bins if name != "triplet" else None,
        "memory_size": args.memory_size if name == "fastap_xbm" else None,
        "margin": args.margin if name == "triplet" else None,
        "dim": args.dim,
        "max_shift": args.max_shift,
    }


def train_one(name: str, train_set: Dataset, held_out: Dataset, args) -> dict:
    """Train (or resume, or just reload) one loss; returns its checkpoint state."""
    device = torch.device(args.device)
    path = Path(args.out) / f"checkpoint-{name}.pt"
    config = run_config(args, name)

    torch.manual_seed(args.seed)  # the same initial weights for every loss
    channels, size = train_set.images.shape[1], train_set.images.shape[-1]
    model = make_model(channels, size, args.dim).to(device)
    # BatchNorm stays in training mode: training from scratch needs its batch statistics.
    # multistage_backward then normalises each chunk of --chunk-size samples with that chunk's
    # statistics (a "ghost batch"), so with chunk-size < batch-size the gradient is that of a
    # chunked forward, not of one full-batch forward; running statistics are updated once per
    # chunk. With the defaults (chunk-size = batch-size on digits) it is the full-batch step.
    # To fine-tune a pretrained backbone, fastap.train.freeze_batchnorm(model) after
    # model.train() makes the multi-stage step equal to a full-batch backward instead.
    model.train()
    criterion = make_loss(name, args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"epoch": 0, "history": [], "seconds": 0.0}

    if path.exists() and not args.restart:
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("version") != CHECKPOINT_VERSION or saved["config"] != config:
            differ = sorted(
                key
                for key in set(config) | set(saved.get("config", {}))
                if saved.get("config", {}).get(key) != config.get(key)
            )
            raise SystemExit(
                f"{path} was written with other settings ({', '.join(differ) or 'version'}): "
                "use the same settings, another --out, or --restart"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        criterion.load_state_dict(saved["criterion"])
        set_rng_states(saved["rng"], device)
        state = {key: saved[key] for key in ("epoch", "history", "seconds")}
        if state["epoch"] >= args.epochs:
            beyond = f", beyond --epochs {args.epochs}" if state["epoch"] > args.epochs else ""
            print(
                f"{name}: finished ({state['epoch']} epochs{beyond}) in {path}, not trained again"
            )
            return state
        print(f"{name}: resuming from {path} after epoch {state['epoch']}/{args.epochs}")

    def log(entry: dict) -> None:
        loss = "   -  " if entry["loss"] is None else f"{entry['loss']:.4f}"
        print(
            f"{name:<10} epoch {entry['epoch']:3d}/{args.epochs}  loss {loss}  held-out "
            f"mAP {entry['map']:.4f}  R@1 {entry['recall@1']:.4f}  ({entry['seconds']:.1f} s)",
            flush=True,
        )

    if state["epoch"] == 0:
        start = time.perf_counter()
        entry = {"epoch": 0, "loss": None, **evaluate(model, held_out, args)}
        state["seconds"] += time.perf_counter() - start
        entry["seconds"] = state["seconds"]
        state["history"].append(entry)
        log(entry)

    groups = class_groups(train_set.labels)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        start = time.perf_counter()
        # The batches and shifts of an epoch depend on the seed and the epoch only: the same for
        # every loss, and the same after a resume.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        batches = epoch_batches(groups, args.batch_size, args.samples_per_class, generator)
        progress = Progress(len(batches), f"{name} epoch {epoch}/{args.epochs}")
        total = 0.0
        for batch in batches:
            images = random_shift(train_set.pixels(batch), args.max_shift, generator)
            images = train_set.standardise(images).to(device)
            labels = train_set.labels[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            # The model runs over the batch in chunks of --chunk-size (twice: without and with a
            # graph), the loss over the whole batch: memory is bounded by the chunk.
            loss = multistage_backward(
                model, images, lambda d, labels=labels: criterion(d, labels), args.chunk_size
            )
            optimizer.step()
            total += float(loss)
            progress.update(f"loss {float(loss):.4f}")
        progress.close()
        entry = {"epoch": epoch, "loss": total / max(1, len(batches))}
        entry.update(evaluate(model, held_out, args))
        state["seconds"] += time.perf_counter() - start
        entry["seconds"] = state["seconds"]
        state["epoch"] = epoch
        state["history"].append(entry)
        save_checkpoint(
            path,
            {
                "version": CHECKPOINT_VERSION,
                "config": config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "criterion": criterion.state_dict(),  # the cross-batch memory, if any
                "rng": rng_states(device),
                **state,
            },
        )
        if epoch % args.log_every == 0 or epoch == args.epochs:
            log(entry)  # after the save: an epoch that is shown is never trained again
    return state


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def results_table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| loss | epochs | mAP before | mAP after | R@1 before | R@1 after | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, state in results.items():
        first, last = state["history"][0], state["history"][-1]
        lines.append(
            f"| {name} | {last['epoch']} | {first['map']:.4f} | {last['map']:.4f} | "
            f"{first['recall@1']:.4f} | {last['recall@1']:.4f} | {state['seconds']:.1f} |"
        )
    return lines


def write_plot(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, state in results.items():
        history = state["history"]
        trained = [h for h in history if h["loss"] is not None]
        axes[0].plot([h["epoch"] for h in trained], [h["loss"] for h in trained], label=name)
        for axis, key in zip(axes[1:], ("map", "recall@1")):
            axis.plot([h["epoch"] for h in history], [h[key] for h in history], label=name)
    titles = ("training loss (each its own scale)", "held-out mAP", "held-out recall@1")
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pixel_line(reference: dict[str, float] | None) -> str:
    if reference is None:
        return ""
    return (
        f"For scale, the cosine similarity of the raw pixels (no network) gives held-out mAP "
        f"{reference['map']:.4f} and R@1 {reference['recall@1']:.4f}."
    )


def write_report(path: Path, args, description: str, model, results, table, reference) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    lines = [
        "# fastap training report",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"- data: {description}",
        f"- model: small CNN ({parameters} parameters) to {args.dim}-dim embeddings, "
        "BatchNorm in training mode",
        f"- schedule: {args.epochs} epochs, batch {args.batch_size} ({args.samples_per_class} "
        f"per class per run), chunk {args.chunk_size}, Adam lr {args.lr}, seed {args.seed}, "
        f"shifts up to {args.max_shift} px, device {args.device}",
        f"- fastap losses: {args.num_bins} bins over the cosine range (-1, 1)"
        + (f", cross-batch memory of {args.memory_size}" if "fastap_xbm" in results else ""),
        "- evaluation: exact mAP and recall@1 of the held-out classes, each image a query "
        "against all the others (fastap.metrics.retrieval_metrics)",
        "",
        "## Results",
        "",
        *table,
        "",
        "Time: training and evaluation, summed over resumed runs. " + pixel_line(reference),
        "",
        "![loss, held-out mAP and recall@1 against epochs](curves.png)",
        "",
        "## Per epoch",
    ]
    for name, state in results.items():
        lines += [
            "",
            f"### {name}: {LOSS_TITLES[name]}",
            "",
            "| epoch | loss | mAP | R@1 |",
            "|---|---|---|---|",
        ]
        for h in state["history"]:
            loss = "-" if h["loss"] is None else f"{h['loss']:.4f}"
            lines.append(f"| {h['epoch']} | {loss} | {h['map']:.4f} | {h['recall@1']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults train on scikit-learn's digits on the CPU in well under a minute.",
    )
    add = parser.add_argument
    add("--data", help="ImageFolder-style directory, one sub-folder per class (default: digits)")
    add("--image-size", type=int, help="side of the --data images after resizing (default 64)")
    add(
        "--loss",
        default="fastap,triplet",
        help=f"comma-separated list, run in this order, of {', '.join(LOSSES)} "
        "(default: %(default)s)",
    )
    add("--epochs", type=int, default=40, help="(default: %(default)s)")
    add("--batch-size", type=int, default=256, help="samples per step (default: %(default)s)")
    add(
        "--chunk-size",
        type=int,
        default=256,
        help="samples per forward pass of the model (default: %(default)s)",
    )
    add(
        "--samples-per-class",
        type=int,
        default=16,
        help="a batch is made of runs of this many samples of one class (default: %(default)s)",
    )
    add("--lr", type=float, default=1e-4, help="Adam's learning rate (default: %(default)s)")
    add("--num-bins", type=int, default=20, help="bins of the fastap losses (default: %(default)s)")
    add("--memory-size", type=int, default=1024, help="fastap_xbm's memory (default: %(default)s)")
    add("--margin", type=float, default=0.2, help="the triplet margin (default: %(default)s)")
    add("--dim", type=int, default=64, help="embedding dimension (default: %(default)s)")
    add("--max-shift", type=int, help="largest random shift in pixels (default: 1/8 of the side)")
    add(
        "--log-every",
        type=int,
        default=5,
        help="print every this many epochs; the report has all (default: %(default)s)",
    )
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--out", default="out/train", help="output directory (default: %(default)s)")
    add("--restart", action="store_true", help="ignore the checkpoints in --out")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.loss.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown or len(set(names)) != len(names):
        parser.error(f"--loss: a comma-separated list of distinct names among {LOSSES}")
    args.losses = names
    positive = ("epochs", "batch_size", "chunk_size", "samples_per_class", "num_bins", "dim")
    for option in (*positive, "log_every", "memory_size"):
        if getattr(args, option) < (2 if option in ("batch_size", "num_bins") else 1):
            parser.error(f"--{option.replace('_', '-')} is too small")
    if args.num_bins > 2**20:
        parser.error("--num-bins: at most 2^20 (the kernels' bound)")
    if args.batch_size < 2 * args.samples_per_class:
        parser.error(
            "--batch-size must be at least twice --samples-per-class: a batch of one class has "
            "no negatives, so every loss is 0 and nothing is learned"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.margin) and args.margin >= 0):
        parser.error(f"--margin must be a non-negative number, got {args.margin}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.max_shift is not None and args.max_shift < 0:
        parser.error("--max-shift must not be negative")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be at least 1")
    if args.data is not None:
        if not Path(args.data).is_dir():
            parser.error(f"--data: {args.data} is not a directory")
        if args.image_size is None:
            args.image_size = 64
    elif args.image_size == 8:
        args.image_size = None  # (the digits' own size: the same run as without it)

    try:  # (a device this torch or machine lacks fails here, before the data is loaded)
        if torch.empty(0, device=torch.device(args.device)).is_meta:
            raise RuntimeError("a meta device holds no data to train on")
        if torch.device(args.device).type == "cpu":
            args.device = "cpu"  # (the CPU has one device: "cpu:1" could not be resumed)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).splitlines()[0]
        parser.error(
            f"--device {args.device}: {reason.split('. ')[0] if len(reason) > 200 else reason}"
        )
    try:  # (last: nothing is written for a run refused above)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: {error.strerror or error}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    # CPU runs are deterministic as they are (the fastap kernels too); on CUDA, cuDNN must be
    # told to pick deterministic convolution algorithms.
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    out = Path(args.out)  # (made by parse_args)

    if args.data is None:
        train_set, held_out, description = load_digits()
        if args.image_size is not None and args.image_size != 8:
            for d in (train_set, held_out):
                d.images = F.interpolate(d.images, size=args.image_size, mode="bilinear")
            description += f", resized to {args.image_size}x{args.image_size}"
    else:
        train_set, held_out, description = load_folder(Path(args.data), args.image_size, out)
    if args.max_shift is None:
        args.max_shift = max(1, train_set.images.shape[-1] // 8)
    print(f"data: {description}")
    print(
        f"losses: {', '.join(args.losses)}; {args.epochs} epochs, batch {args.batch_size}, "
        f"chunk {args.chunk_size}, lr {args.lr}, seed {args.seed}, device {args.device}"
    )

    results = {}
    for name in args.losses:
        results[name] = train_one(name, train_set, held_out, args)

    write_plot(out / "curves.png", results)
    table = results_table(results)
    torch.manual_seed(args.seed)
    model = make_model(train_set.images.shape[1], train_set.images.shape[-1], args.dim)
    reference = pixel_reference(held_out)
    write_report(out / "report.md", args, description, model, results, table, reference)
    print()
    print("\n".join(table))
    if reference is not None:
        print(pixel_line(reference))
    print(f"\nwrote {out / 'report.md'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
