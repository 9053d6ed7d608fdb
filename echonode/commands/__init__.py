"""The ``echonode`` command line."""
