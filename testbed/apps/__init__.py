"""Applications: programs that run on the emulated nodes, one package each.

Each application (``inference`` today) is a package of node programs (with a typed settings
dataclass each; thin entry points in ``nodes/``), a driver that runs them on a live network, and
the workload a suite point runs.  Every program is started, watched and stopped by the one
launcher, ``testbed.apps.launch``, the only module applications share.  Applications use the
network (``testbed.net``), the wire format and the model; the layers below never import them.
"""
