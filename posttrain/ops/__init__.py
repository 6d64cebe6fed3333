"""Pure tensor kernels: token-id checks, softmax statistics, entropy, log-probs through a
linear head, and the fused NLL loss. Modules here import only torch and each other, so
they can be read, tested and reused without transformers or any of posttrain above them.
"""
