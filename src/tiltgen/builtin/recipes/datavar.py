"""Record the latents' per-channel variance (``data_var``) in generator folders' ``tiltgen.json``.

    python -m tiltgen.builtin.recipes.datavar src/tiltgen/builtin/weights/world-flow ...

Training-free guidance uses it as the variance of its proxy prior; the built-in latents'
channels differ by about 3x (docs/training-free-guidance.md). The generator recipes write it
themselves; this stamps folders trained before they did. The VAE's weights alone decide it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .latents import DATA_VAR_IMAGES, DATA_VAR_SEED, latent_channel_variance
from .pipelines import load_vae


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiltgen.builtin.recipes.datavar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="generator pipeline folders (with vae/ and tiltgen.json)")
    parser.add_argument("--images", type=int, default=DATA_VAR_IMAGES)
    parser.add_argument("--seed", type=int, default=DATA_VAR_SEED)
    args = parser.parse_args(argv)
    for folder in map(Path, args.folders):
        info_path = folder / "tiltgen.json"
        if not info_path.is_file() or not (folder / "vae").is_dir():
            print(f"error: {folder} is not a generator folder (needs tiltgen.json and vae/)", file=sys.stderr)
            return 2
        info = json.loads(info_path.read_text())
        info["data_var"] = latent_channel_variance(load_vae(folder), args.images, args.seed)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"{folder}: data_var {info['data_var']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
