"""Tests of ``echonode.network``."""
