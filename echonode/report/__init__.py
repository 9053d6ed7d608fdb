"""The SR a study gets back: a TID 1500 Imaging Measurement Report.

Split the way highdicom splits its own ``sr`` package, one concern a module:

* :mod:`~echonode.report.codes`: the concepts the report uses and the codes
  of each task's finding;
* :mod:`~echonode.report.findings`: what the builder is given (a finding per
  task and the videos it used), checked at the door;
* :mod:`~echonode.report.header`: the study header the report copies, read
  bounded and repaired (normalised values, character sets), with the
  identifying attributes copied exactly;
* :mod:`~echonode.report.build`: :func:`~echonode.report.build.build_report`,
  the document built with highdicom;
* :mod:`~echonode.report.read`: :func:`~echonode.report.read.summarise_report`,
  a report read back into a plain dict.

Nothing is re-exported here: importing one module must not import highdicom
for the others (only :mod:`~echonode.report.build` and
:mod:`~echonode.report.header` need it).
"""
