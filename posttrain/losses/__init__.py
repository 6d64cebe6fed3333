"""Objectives for the engine's `Run.accumulate`: each turns a micro-batch into its share
of an optimizer step's loss, normalised so that the step's gradient does not depend on
how it is split into micro-batches and ranks. `nll`: response-token NLL (SFT, expert
iteration); `policy_gradient`: GRPO's loss on rollouts, with its KL penalty."""
