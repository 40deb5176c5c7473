"""``csqcfs-deploy train``: train a CS-QCFS network on an embedded dataset, a local CIFAR
copy or your own ``--data FILE.npz``."""

from __future__ import annotations

import argparse

from csqcfs_deploy.cli import arg_types
from csqcfs_deploy.cli.commands.common import add_json_arg, console, print_json
from csqcfs_deploy.cli.dataset_args import add_dataset_args, resolve_dataset
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.files import check_output
from csqcfs_deploy.train.checkpoint import save_checkpoint
from csqcfs_deploy.train.training import TrainOptions, train
from csqcfs_deploy.train.zoo import ARCHITECTURES

# the architecture trained when --arch is not given, by input shape
DEFAULT_ARCH: dict[tuple[int, ...], str] = {(1, 8, 8): "digits-cnn", (3, 32, 32): "resnet20"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a CS-QCFS network",
                       description="Train a CS-QCFS network and save a checkpoint. digits is "
                       "scikit-learn's load_digits with a fixed stratified 80/20 split (seed 0).")
    add_dataset_args(p, default_help="dataset (default digits)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                   help="architecture (default: digits-cnn for 1x8x8 inputs, resnet20 for "
                   "3x32x32)")
    p.add_argument("--levels", type=arg_types.levels, default=1,
                   help=f"quantization levels L, 1..{arg_types.MAX_LEVELS} (default 1)")
    p.add_argument("--phi", type=arg_types.phi, default=0.5,
                   help="QCFS shift phi in [0, 1) (default 0.5)")
    p.add_argument("--epochs", type=arg_types.positive_int, default=20)
    p.add_argument("--batch-size", type=arg_types.positive_int, default=64)
    p.add_argument("--lr", type=arg_types.positive_float, default=5e-3,
                   help="learning rate, a finite number > 0 (default 0.005)")
    p.add_argument("--seed", type=arg_types.seed, default=0)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, "checkpoint")  # before the training, not after it
    if args.levels < 1:
        raise UsageError(f"--levels must be >= 1, got {args.levels}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    dataset = resolve_dataset(args)
    arch = args.arch or DEFAULT_ARCH.get(dataset.input_shape)
    if arch is None:
        shape = "x".join(str(d) for d in dataset.input_shape)
        raise UsageError(f"no architecture of the zoo takes {shape} inputs by default "
                         f"({dataset.name}); give --arch")
    options = TrainOptions(arch=arch, levels=args.levels, phi=args.phi, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           progress=not args.json)
    result = train(dataset, options)
    save_checkpoint(args.output, result.model, result.config)
    summary = {
        "test_accuracy": result.test_accuracy, "train_accuracy": result.train_accuracy,
        "seconds": round(result.seconds, 2), "epochs": result.epochs, "arch": arch,
        "levels": args.levels, "dataset": dataset.name, "seed": args.seed,
        "test_samples": int(len(dataset.y_test)), "classes": dataset.classes,
        "encoding": dataset.encoding.to_json(), "output": args.output,
    }
    if args.json:
        print_json(summary)
    else:
        console().print(
            f"trained {arch} (L={args.levels}) on {dataset.describe()} in "
            f"{result.seconds:.1f} s: test accuracy {100 * result.test_accuracy:.2f} % "
            f"(train {100 * result.train_accuracy:.2f} %)\n"
            f"wrote {args.output}"
        )
    return 0
