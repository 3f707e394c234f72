"""Everything that knows DeepSpeed ZeRO-3's internals, in one room.

engine.py      configs, the engine build: activation checkpointing -> per-block gather -> compile
               -> ZeRO-3 (the one place parallelism is applied)
partitions.py  what a rank holds; persistent parameters; setting partitions from full tensors
ema.py         the sharded EMA (and its config), applied for sampling with every parameter swapped
files.py       shard files and their names, checksums while writing, reading them without pickle
state.py       save / restore / read a whole training state: the interface the trainer uses
"""
