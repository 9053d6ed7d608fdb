"""Tests of ``train``."""
