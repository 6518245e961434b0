"""A local, Scenario-compatible API server for tests, demos and benchmarks.

from pipeline.sandbox import Sandbox, SandboxConfig
with Sandbox(SandboxConfig(latency=0.1)) as sb:
    ...  # point a client at sb.url with key/secret "sandbox"/"sandbox"
"""

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.server import Sandbox

__all__ = ["Sandbox", "SandboxConfig"]
