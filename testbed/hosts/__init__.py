"""Where a node runs: process hosts (cgroups), container hosts, their limits and images.

Below the network layer: ``testbed.net`` builds hosts from here and never the other way round.
"""
