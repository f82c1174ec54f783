"""Tuners: one package per method. Importing this module registers each with the core registry."""

from .sc_tuner import SCTuner, SCTunerConfig

__all__ = ["SCTuner", "SCTunerConfig"]
