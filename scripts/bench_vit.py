#!/usr/bin/env python
"""HST vs full fine-tuning, linear probe and peft LoRA training cost on ViT-B/16; see ``vistune.bench.vit``
(same as ``vistune bench vit``)."""

from vistune.bench.vit import main

if __name__ == "__main__":
    raise SystemExit(main())
