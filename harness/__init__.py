"""The harness: typed configuration, schedules, device choice and run records shared by train.py and scripts/."""
