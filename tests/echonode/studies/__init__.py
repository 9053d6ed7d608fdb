"""Tests of ``echonode.studies``."""
