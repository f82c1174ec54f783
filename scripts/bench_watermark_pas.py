#!/usr/bin/env python
"""PAS vs whole-decoder watermark tuning (same as ``vistune bench watermark-pas``); see vistune/bench/watermark_pas.py."""

from vistune.bench.watermark_pas import main

if __name__ == "__main__":
    raise SystemExit(main())
