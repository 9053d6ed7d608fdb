"""Tests of ``echonode.ops``."""
