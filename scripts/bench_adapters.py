#!/usr/bin/env python
"""The adapter family (linear, full, LoRA, adapter, MoSA, Pear) on VTAB-1k-style tasks, and its ViT-B/16 training
cost with --cost; see ``vistune.bench.adapters`` (same as ``vistune bench adapters``)."""

from vistune.bench.adapters import main

if __name__ == "__main__":
    raise SystemExit(main())
