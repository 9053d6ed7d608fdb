"""The test suite; its folders mirror the packages they test (``tests/echonode/receive`` tests ``echonode/receive``).

Every test folder is a package, so that pytest imports each test module
under its full dotted name (``tests.echonode.receive.test_scp``): two test
files with the same name in different folders cannot clash, and the shared
helpers at this level (``tests.peers``, ``tests.factories``, ...) and
``tests/conftest.py`` are imported once, under one name.
"""
