"""echonode-train: EchoCLR pretraining, fine-tuning and evaluation from an echo archive."""
