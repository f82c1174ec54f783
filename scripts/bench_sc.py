#!/usr/bin/env python
"""SC-Tuner vs peft LoRA vs full fine-tuning training cost; see ``vistune.bench.sc`` (same as ``vistune bench sc``)."""

from vistune.bench.sc import main

if __name__ == "__main__":
    raise SystemExit(main())
