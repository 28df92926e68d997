"""``difix3d fix`` (images or folders in, fixed images out) and ``difix3d convert`` (any checkpoint -> ours)."""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict

import numpy as np

from difix3d import storage
from difix3d.argtypes import positive_int
from difix3d.errors import InputError
from difix3d.imageio import IMAGE_EXTENSIONS, read_image, write_image

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fix", help="fix rendered images with Difix",
                              description="Fix images (files or folders) with a Difix checkpoint; outputs keep each "
                                          "input's name and size.")
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    p.add_argument("--ref", help="reference view: one image for all inputs, or a folder holding each input's "
                                 "reference at the same relative path (for a file input: the same name)")
    p.add_argument("--checkpoint", help="fixer checkpoint (ours, official .pkl, nvidia/difix folder, SD-Turbo "
                                        "folder); default: the bundled tiny demo one")
    p.add_argument("--base", help="SD-Turbo folder, for official .pkl checkpoints")
    p.add_argument("-o", "--output", required=True, help="output folder (URI)")
    p.add_argument("--batch", type=positive_int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when present)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many images)")
    p.set_defaults(func=run_fix)

    c = subparsers.add_parser("convert", help="convert a fixer checkpoint to difix3d's format",
                              description="Convert any supported fixer checkpoint to ours (model.safetensors + "
                                          "config.json, prompt embedding included).")
    c.add_argument("source", help="official .pkl, nvidia/difix folder, SD-Turbo folder or hub id (local cache)")
    c.add_argument("dest", help="output folder (URI)")
    c.add_argument("--base", help="SD-Turbo folder, for official .pkl checkpoints")
    c.set_defaults(func=run_convert)


def run_fix(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from difix3d.fixer.bundled import default_checkpoint
    from difix3d.fixer.runner import FixerRunner

    jobs = list_inputs(args.inputs)  # (input uri, output name)
    if not jobs:
        raise InputError(" ".join(args.inputs), f"no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    overwritten = [src for src, name in jobs if _same_file(src, storage.join(args.output, name))]
    if overwritten:  # the fixed image would replace its own input
        raise InputError(overwritten[0], f"-o {args.output} would overwrite this input ({len(overwritten)} in all): "
                                         "choose another output folder")
    runner = FixerRunner.from_checkpoint(args.checkpoint or default_checkpoint(), device=args.device,
                                         compile=args.compile, max_batch=args.batch, base=args.base)
    ref_for = _reference_lookup(args.ref)
    with tqdm(total=len(jobs), desc="fix", unit="img") as bar:
        for group in _batches(jobs, args.batch):
            images = [read_image(src) for src, _ in group]
            refs = [ref_for(src, name, img.shape) for (src, name), img in zip(group, images)] if args.ref else None
            by_size = defaultdict(list)  # one forward per size: a batch must share H x W
            for i, img in enumerate(images):
                by_size[img.shape].append(i)
            for idx in by_size.values():
                out = runner.fix(np.stack([images[i] for i in idx]),
                                 None if refs is None else np.stack([refs[i] for i in idx]))
                for k, i in enumerate(idx):
                    write_image(storage.join(args.output, group[i][1]), out[k])
            bar.update(len(group))
    log.info("fixed %d images into %s", len(jobs), args.output)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from difix3d.fixer.checkpoint import convert_checkpoint

    convert_checkpoint(args.source, args.dest, base=args.base)
    print(args.dest)
    return 0


def _same_file(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return os.path.abspath(storage.resolve(a)[1]) == os.path.abspath(storage.resolve(b)[1])
    return a.rstrip("/") == b.rstrip("/")


def list_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Files and folders -> (image uri, output name): a file keeps its name, a folder's images their relative path."""
    jobs = []
    for uri in inputs:
        if storage.is_dir(uri):
            for path in sorted(_walk(uri)):
                jobs.append((path, os.path.relpath(path, uri) if storage.is_local(uri) else path[len(uri):].lstrip("/")))
        elif storage.exists(uri):
            jobs.append((uri, os.path.basename(uri)))
        else:
            raise InputError(uri, "no such file or folder")
    names = [n for _, n in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(", ".join(inputs), f"several inputs would write the same output names: {dup[:5]}")
    return jobs


def _walk(uri: str) -> list[str]:
    out = []
    for entry in storage.list_dir(uri):
        if storage.is_dir(entry):
            out.extend(_walk(entry))
        elif entry.lower().endswith(IMAGE_EXTENSIONS):
            out.append(entry)
    return out


def _reference_lookup(ref: str | None):
    """--ref as a function (input uri, its output name, shape) -> reference image of that shape. A folder is looked up
    at the input's output name: its path relative to the input folder (``cam1/0.png``), or a file input's name."""
    if ref is None:
        return None
    if not storage.is_dir(ref):
        image = read_image(ref)
        return lambda src, name, shape: _same_size(image, shape, ref)

    def lookup(src: str, name: str, shape):
        path = storage.join(ref, name)
        if not storage.exists(path):
            raise InputError(path, f"no reference image for {src}")
        return _same_size(read_image(path), shape, path)

    return lookup


def _same_size(image, shape, source: str):
    if image.shape != shape:
        raise InputError(source, f"reference is {image.shape[1]}x{image.shape[0]}, the input {shape[1]}x{shape[0]}; "
                                 "a reference must match its input's size")
    return image


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
