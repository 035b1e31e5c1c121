"""Node agent core: reconcile a node's pod-dependent redirection state against the plan.

The desired state comes from :func:`xdsserver.redirect.build_plan` (one source of truth); this
package only reads the kernel and applies the difference.
"""

from .reconcile import Changes, KernelState, desired_state, diff, reconcile

__all__ = ["Changes", "KernelState", "desired_state", "diff", "reconcile"]
