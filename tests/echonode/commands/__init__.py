"""Tests of ``echonode.commands``."""
