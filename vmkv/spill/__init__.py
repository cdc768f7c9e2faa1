"""The spill tier: cold KV blocks go to shared host memory instead of being dropped, and
come back on a prefix hit, for every instance of the same model on the node."""

from vmkv.spill._index import SegmentError
from vmkv.spill.host_tier import tier_stats, user_tiers
from vmkv.spill.keys import Namespace
from vmkv.spill.store import ABSENT, ON_DEVICE, ON_HOST, SpillStore, SpillTierFull, Transfer

__all__ = [
    "ABSENT",
    "ON_DEVICE",
    "ON_HOST",
    "Namespace",
    "SegmentError",
    "SpillStore",
    "SpillTierFull",
    "Transfer",
    "tier_stats",
    "user_tiers",
]
