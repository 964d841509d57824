"""Ray actors wrapping the pure stages of `loader`, and the pipeline that wires them.

Nothing outside this package imports Ray.
"""

import os

# A local Ray advertises the machine's external address unless cluster mode is off; a local
# service keeps all of Ray's traffic on loopback. Ray reads this when it is first imported, so it
# is set here, before any module of this package imports ray. A cluster deployment sets
# RAY_ADDRESS (KubeRay does), which leaves Ray's default alone.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
