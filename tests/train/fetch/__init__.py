"""Tests of ``train.fetch``."""
