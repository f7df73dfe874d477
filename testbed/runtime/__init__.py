"""Node runtimes: Mininet process hosts and Docker containers."""
