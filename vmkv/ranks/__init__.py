"""Tensor parallelism: the scheduler's page decisions carried to every rank's KV shard.

``RankServer`` runs in each rank's worker process; ``RankGroup`` in the scheduler's
process drives all of them as one backend, over one shared-memory channel per rank.
"""

from vmkv.ranks.channel import ChannelError
from vmkv.ranks.group import RankGroup
from vmkv.ranks.server import RankServer

__all__ = ["ChannelError", "RankGroup", "RankServer"]
