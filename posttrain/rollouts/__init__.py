"""Rollouts for RL methods: the questions a run samples from (`questions`) and groups of
sampled, scored responses with their advantages (`sampling`), the same on any number of
ranks."""
