"""Tests of ``echonode.measurements``."""
