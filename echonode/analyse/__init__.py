"""From stored objects to results: decode, preprocess, the study pipeline, the inference worker."""
