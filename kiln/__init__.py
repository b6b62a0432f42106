"""Kiln: the client SDK, the Core API for training code, and the ``kiln`` CLI.

Training scripts written for Determined run with one changed line: ``import kiln as det``.
"""

from kiln import core
from kiln._info import ClusterInfo, TrialInfo, get_cluster_info
from kiln.core import InvalidHP

# Determined's log format, so log parsers written for it keep working.
LOG_FORMAT = "%(levelname)s: [%(process)s] %(name)s: %(message)s"

__all__ = ["ClusterInfo", "InvalidHP", "LOG_FORMAT", "TrialInfo", "core", "get_cluster_info"]
