"""Node agent: keep a node's kernel state (both the node's namespace and the ztunnel pod's)
equal to the redirection plan of :func:`xdsserver.redirect.build_plan` (one source of truth);
this package only reads the kernel, applies the difference and reports it.
"""

from .node import NodeAgent, PassResult, Ztunnel
from .reconcile import Change, Changes, cleanup, reconcile

__all__ = ["Change", "Changes", "NodeAgent", "PassResult", "Ztunnel", "cleanup", "reconcile"]
