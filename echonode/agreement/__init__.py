"""How often the node's models agree with the sonographers' own measurements.

* :mod:`~echonode.agreement.record`: the node's job that reads each study's
  echo measurement SRs (:mod:`echonode.measurements`) and records the
  reference labels beside the models' results in the journal;
* :mod:`~echonode.agreement.figures`: AUROC with a stratified bootstrap
  interval, sensitivity, specificity and confusion counts per model, task
  and cart (``echonode agreement``, ``status --json``, the metrics, the
  status page).

The node process imports this package: no torch, no training code.
"""
