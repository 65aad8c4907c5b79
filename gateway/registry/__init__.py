"""Forget-target registry: the target model and the stores that keep it (ARCHITECTURE §5).

``targets`` validates, ``store`` is the contract every store meets, ``redis_store`` and ``sqlite_store``
implement it, ``changes`` holds the I/O-free decisions both share. Import the stores through ``open_store`` so
the Redis client is loaded only when a Redis URL is configured.
"""

from gateway.registry.status import PolicyState, PolicyStatus
from gateway.registry.store import (
                                    ImportLineError,
                                    ImportMode,
                                    ImportRejected,
                                    StoreError,
                                    StoreUnavailable,
                                    TargetExists,
                                    TargetNotFound,
                                    TargetStore,
                                    open_store,
)
from gateway.registry.targets import (
                                    AuditEntry,
                                    EcoPolicy,
                                    GuardPolicy,
                                    OutputGuardSettings,
                                    Policy,
                                    RefusePolicy,
                                    Target,
                                    TargetPatch,
                                    UldPolicy,
                                    slugify,
)

__all__ = [
    "AuditEntry", "EcoPolicy", "GuardPolicy", "ImportLineError", "ImportMode", "ImportRejected",
    "OutputGuardSettings", "Policy", "PolicyState", "PolicyStatus", "RefusePolicy", "StoreError", "StoreUnavailable",
    "Target", "TargetExists", "TargetNotFound", "TargetPatch", "TargetStore", "UldPolicy", "open_store", "slugify",
]
