"""What every association shares, both roles: PDU limits, read deadlines, the outside deadline, TLS."""
