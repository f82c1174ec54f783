#!/usr/bin/env python
"""Watermark decoder tuning benchmark (same as ``vistune bench watermark``); see vistune/bench/watermark.py."""

from vistune.bench.watermark import main

if __name__ == "__main__":
    raise SystemExit(main())
