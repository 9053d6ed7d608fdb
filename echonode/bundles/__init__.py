"""Model bundles: the torch-free manifest, the weights, the networks and their runtimes."""
