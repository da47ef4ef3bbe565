"""The training loop's parts (the loop itself is train.py's `train()`).

    schedule.py  ScheduleConfig, the lr factor of every step (constant, cosine, linear, WSD), the evaluation steps
    state.py     LoopState (step, clocks, optimizer FLOPs, divergence watch; checkpointed) and Clock
"""
