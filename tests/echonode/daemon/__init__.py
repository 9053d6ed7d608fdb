"""Tests of ``echonode.daemon``."""
