"""Tests of ``echonode.analyse``."""
