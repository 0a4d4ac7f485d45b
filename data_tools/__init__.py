"""stm-shards: turn an image folder into webdataset shards that DALI can read without surprises.

Every image is decoded once while writing, so nothing undecodable ever reaches a training run
(DALI has no "skip bad sample" switch: one bad JPEG stops a pipeline hours into a run).
"""

TOOL_VERSION = "1.0.0"
