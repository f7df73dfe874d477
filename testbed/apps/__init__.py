"""Applications: programs that run on the emulated nodes, one package each.

Each application (``inference`` today) is a package of node programs, a driver that runs
them on a live network, and the workload a suite point runs.  Applications use the
network (``testbed.net``), the wire format and the model; the layers below never import them.
"""
