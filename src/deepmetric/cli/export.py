"""`deepmetric export MODEL`: Embedding Projector files and a 2-D map of data.

The files are written into a hidden temporary folder beside --out and renamed to --out
when complete. An existing --out is refused unless --force, which replaces only a folder
holding export's own files (checked by `parser.check_paths` before keras loads).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from deepmetric.cli import data
from deepmetric.cli.parser import CliError
from deepmetric.export import plot_embeddings, write_projector


def run(args) -> int:
    model = data.load_model(args.model)
    dataset = data.load_data(args.data)
    x, y = data.select(dataset, args.split, args.test_size, args.seed)
    embeddings = data.embed(model, x)
    out = Path(args.out)
    names = dataset.class_names
    images = x if dataset.is_image else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's folder is private
        write_projector(tmp, embeddings, y, images=images, class_names=names)
        plot_embeddings(tmp / "map.png", embeddings, y, args.map_method, class_names=names)
        if out.exists():  # --force, checked: a folder of export files
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        raise CliError(f"--out {out}: cannot write the export ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.quiet:
        print(f"wrote Embedding Projector files and map.png to {out}")
    return 0
