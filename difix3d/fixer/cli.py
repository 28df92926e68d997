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
from difix3d.imageio import IMAGE_EXTENSIONS, read_image, resize_image, write_image

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
    _check_output_spares_inputs(args.output, args.inputs, jobs, args.ref)
    _check_references_exist(args.ref, jobs)  # before the model loads: a wrong --ref is said at once
    _check_output_folder(args.output)
    runner = FixerRunner.from_checkpoint(args.checkpoint or default_checkpoint(), device=args.device,
                                         compile=args.compile, max_batch=args.batch, base=args.base)
    ref_for = _reference_lookup(args.ref)
    failed: list[InputError] = []  # a bad image is named and skipped: the others are still fixed
    with tqdm(total=len(jobs), desc="fix", unit="img") as bar:
        for group in _batches(jobs, args.batch):
            ready = []  # (output name, image, reference or None)
            for src, name in group:
                try:
                    image = read_image(src)
                    ready.append((name, image, ref_for(src, name, image.shape) if args.ref else None))
                except InputError as e:
                    failed.append(e)
                    log.error("skipped: %s", e)
            by_size = defaultdict(list)  # one forward per size: a batch must share H x W
            for name, image, ref in ready:
                by_size[image.shape].append((name, image, ref))
            for items in by_size.values():
                out = runner.fix(np.stack([image for _, image, _ in items]),
                                 None if args.ref is None else np.stack([ref for _, _, ref in items]))
                for (name, _, _), fixed in zip(items, out):
                    write_image(storage.join(args.output, name), fixed)
            bar.update(len(group))
    log.info("fixed %d images into %s", len(jobs) - len(failed), args.output)
    if failed:
        rest = f"the others are in {args.output}" if len(failed) < len(jobs) else "none was fixed"
        raise InputError(failed[0].source, f"{failed[0].problem} ({len(failed)} of {len(jobs)} images not fixed, "
                                           f"each logged above; {rest})")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from difix3d.fixer.checkpoint import convert_checkpoint

    convert_checkpoint(args.source, args.dest, base=args.base)
    print(args.dest)
    return 0


def _location(uri: str) -> str:
    """:func:`storage.normalized`, with a local path's symlinks resolved too (an output reached through a link)."""
    where = storage.normalized(uri)
    return os.path.realpath(where) if storage.is_local(uri) else where


def _check_output_spares_inputs(output: str, inputs: list[str], jobs: list[tuple[str, str]], ref: str | None) -> None:
    """Refuse an output folder that is, or lies inside, an input or reference folder, or output files that are
    input or reference files (symlinks resolved): fixed images would replace inputs or references, or become inputs
    of the next run."""
    out = _location(output)
    for folder in [u for u in [*inputs, ref] if u and storage.is_dir(u)]:
        where = _location(folder).rstrip("/")
        if out == where or out.startswith(where + "/"):
            raise InputError(folder, f"-o {output} is inside this input folder: fixed images would replace or join "
                                     "its images; choose an output folder outside it")
    written = {_location(storage.join(output, name)) for _, name in jobs}
    for src in [src for src, _ in jobs] + ([ref] if ref else []):
        if _location(src) in written:
            raise InputError(src, f"-o {output} would overwrite this file: choose another output folder")


def _check_output_folder(output: str) -> None:
    """Create ``-o`` before the model loads, so that a file in its place or a folder the user may not write is said at
    once instead of after loading (and, for a file, after the first batch)."""
    if storage.exists(output) and not storage.is_dir(output):
        raise InputError(output, "-o names a file, not a folder: give a folder for the fixed images")
    storage.makedirs(output)  # a file among its parents, or no permission: one line naming the path (errors.py)
    if storage.is_local(output) and not os.access(storage.resolve(output)[1], os.W_OK | os.X_OK):
        raise InputError(output, "output folder is not writable: choose another -o or fix its permissions")


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
            raise InputError(src, f"no reference for this image (looked for {path})")
        return _same_size(read_image(path), shape, path)

    return lookup


def _check_references_exist(ref: str | None, jobs: list[tuple[str, str]]) -> None:
    """``--ref``: the file, or in a folder each input's reference, exists; an :class:`InputError` naming what is
    missing (and how many) otherwise."""
    if ref is None:
        return
    if not storage.is_dir(ref):
        if not storage.exists(ref):
            raise InputError(ref, "reference image not found")
        return
    missing = [(src, storage.join(ref, name)) for src, name in jobs if not storage.exists(storage.join(ref, name))]
    if missing:
        src, path = missing[0]
        raise InputError(src, f"no reference for this image (looked for {path}); {len(missing)} of {len(jobs)} "
                              f"inputs have none in {ref}")


def _same_size(image, shape, source: str):
    """The reference at its input's size: resized with Lanczos, as the official Difix code does."""
    return resize_image(image, shape[0], shape[1])


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
