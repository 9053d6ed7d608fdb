"""Tests of ``echonode``."""
