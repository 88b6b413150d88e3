"""edgecluster: pool everyday devices into one AI cluster.

Layers, imports pointing down only:
api -> plan -> engine -> comm -> net -> weights -> types, config, errors.
"""

PROTOCOL_VERSION = 1
__version__ = "0.1.0"
