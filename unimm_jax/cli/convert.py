"""unimm-convert --from hf|deepseek|unimm --to hf|deepseek|unimm SRC DST [--dtype bfloat16|float32]

Streams tensor by tensor: peak memory stays near one copy of the checkpoint in its dtype.
DST is written under a temporary name and appears only when complete.
"""
from __future__ import annotations

import argparse
import sys

from unimm_jax.convert.checkpoints import FORMATS, detect_layout, read_checkpoint, write_checkpoint
from unimm_jax.convert.safetensors_io import CheckpointError

DTYPES = ("bfloat16", "float32", "float16")


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for u, f in units.items():
        if text.upper().endswith(u):
            return int(float(text[: -len(u)]) * f)
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unimm-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", choices=FORMATS, required=True, help="layout of SRC")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True, help="layout to write")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep the source dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for hf/deepseek output")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = p.parse_args(argv)
    try:
        found = detect_layout(args.src)
        if found != args.src_format:
            raise CheckpointError(f"{args.src} is a {found!r} checkpoint, not {args.src_format!r}; pass --from {found}.")
        ckpt = read_checkpoint(args.src, args.dtype, lazy=True)  # every route streams
        write_checkpoint(ckpt, args.dst, args.dst_format, args.dtype, args.overwrite, parse_size(args.max_shard_size))
    except (CheckpointError, ValueError) as e:
        print(f"unimm-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst_format} checkpoint to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
