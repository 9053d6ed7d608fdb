"""Tests of ``echonode.agreement``."""
