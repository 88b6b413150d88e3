"""edgecluster: pool everyday devices into one AI cluster.

Layers, imports pointing down only:
api -> plan -> engine -> comm -> net -> weights -> types, config, errors.
"""

PROTOCOL_VERSION = 4  # 4: agents all-reduce among themselves, the hub waits out the layers
# 3: the token is proven, never sent; data-channel frames are MACed or sealed
__version__ = "0.1.0"
