"""Tests of ``echonode.bundles``."""
