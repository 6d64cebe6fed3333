"""RL with verifiable rewards on the engine: `GRPO` (CS336 Algorithm 3) and expert
iteration (Algorithm 2). `questions` is the data source, `rollouts` samples and scores
groups, `objective` is the policy-gradient loss with its exact normalisation, `method`
the GRPO step, `train` the entry points."""
