"""Regenerate VPT-style FGVC json splits (seeded 90/10 of the official train list) with an md5 manifest.

    python scripts/make_fgvc_splits.py --train official_train.txt --test official_test.txt --out data/CUB_200_2011

Each list file holds "<path relative to the image root> <label>" lines (read_list's format). The same
inputs and seed always give byte-identical json files; `splits.md5` records their checksums.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpeft.data.fgvc import make_splits
from mmpeft.data.image_list import read_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="official train list")
    parser.add_argument("--test", required=True, help="official test list")
    parser.add_argument("--out", required=True, help="dataset root to write train/val/test.json into")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    train = dict(read_list(Path(args.train)))
    test = dict(read_list(Path(args.test)))
    for name, md5 in make_splits(train, test, args.out, args.val_fraction, args.seed).items():
        print(f"{md5}  {Path(args.out) / name}")


if __name__ == "__main__":
    main()
