"""Delivering SRs: the durable outbox, one lane per destination, C-STORE and STOW-RS."""
