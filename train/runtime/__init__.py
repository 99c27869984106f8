"""The only code that touches torch.distributed / deepspeed / accelerate or reads RANK/WORLD_SIZE/LOCAL_RANK: processes and precision, inference placement, preemption, failpoints, shard jobs."""
