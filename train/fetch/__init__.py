"""``echonode-train fetch``: pull echo studies from the PACS into an archive, resumably and gently.

query.py (C-FIND, QIDO-RS, the criteria), retrieve.py (C-MOVE with fetch's
own storage SCP, C-GET), web.py (DICOMweb session and WADO-RS), sources.py
(the two kinds of PACS), landing.py (atomic files), journal.py (what came),
pacing.py (window, bandwidth cap, backoff), runner.py (the run), cli.py.
"""
