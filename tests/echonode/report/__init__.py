"""Tests of ``echonode.report``."""
