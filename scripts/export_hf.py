"""Convert checkpoints to the Hugging Face MDLM format (config.json + model.safetensors) and back.

    python scripts/export_hf.py outputs/.../checkpoints/last.ckpt mdlm-hf          # EMA weights
    python scripts/export_hf.py outputs/.../checkpoints/last.ckpt mdlm-hf --no-ema # raw weights
    python scripts/export_hf.py --to-ckpt mdlm-hf mdlm.ckpt                        # and back

The source may be any format ``eval.checkpoint_path`` accepts (ours, the original's mdlm.ckpt /
sedd.ckpt, a Hugging Face directory or hub repo). The exported directory loads with
``AutoModelForMaskedLM.from_pretrained(dir)`` after ``import models.hf`` (no remote code), and with
``eval.checkpoint_path=dir backbone=hf_dit``. Only DiT checkpoints (MDLM, SEDD, D3PM, UDLM, DUO and
its distilled students: config.json records the algorithm with its options) can be exported; the
AR transformer has no Hugging Face MDLM form. ``--to-ckpt`` writes a checkpoint of this code for
evaluation (``state_dict``, ``config``, ``ema``). Both directions are exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="checkpoint file, Hugging Face directory or hub repo")
    parser.add_argument("dest", type=Path, help="output directory (export) or .ckpt file (--to-ckpt)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--to-ckpt", action="store_true", help="write a checkpoint of this code instead")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="read a Hugging Face source with its own remote code")
    args = parser.parse_args(argv)

    from checkpoints import export_hf, load_checkpoint, save_as_ours

    loaded = load_checkpoint(args.source, trust_remote_code=args.trust_remote_code)
    if args.to_ckpt:
        args.dest.parent.mkdir(parents=True, exist_ok=True)
        save_as_ours(loaded, args.dest)
        print(f"Wrote {args.dest} ({loaded.format} -> ours, {loaded.backbone_kind})")
        return
    export_hf(loaded, args.dest, use_ema=not args.no_ema)
    weights = "raw" if args.no_ema or loaded.ema is None else "EMA"
    print(f"Wrote {args.dest}/config.json and model.safetensors ({loaded.format} -> hf, {weights} weights)")


if __name__ == "__main__":
    main()
