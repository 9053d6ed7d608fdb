"""Tests of ``echonode.receive``."""
