"""Tests of ``train.synth``."""
