"""Tests of ``echonode.delivery``."""
