"""SeCO engine: chunk-wise exact (SeCO) and sparse unbiased (SpaCO) backprop for long-context fine-tuning."""
