"""``echonode serve``: the node process and its supervision of the inference worker."""
