"""End-to-end tests that cross packages: the node as a process, real peers, the architecture's rules, deployment files."""
