#!/usr/bin/env python
"""CSC-Tuner vs diffusers ControlNet training cost; see ``vistune.bench.csc`` (same as ``vistune bench csc``)."""

from vistune.bench.csc import main

if __name__ == "__main__":
    raise SystemExit(main())
