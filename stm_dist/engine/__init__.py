"""The DeepSpeed training engine: experiment schema (config), schedules, EMA, checkpoints
(save, newest complete, universal conversion, export), evaluation and the training loop.

The only package that imports DeepSpeed, and only when a run starts: importing this is cheap.
"""
