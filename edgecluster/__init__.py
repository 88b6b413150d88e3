"""edgecluster: pool everyday devices into one AI cluster.

Layers, imports pointing down only:
api -> plan -> engine -> comm -> net -> weights -> types, config, errors.
"""

PROTOCOL_VERSION = 2  # 2: tensors on the data channel travel as raw frames
__version__ = "0.1.0"
