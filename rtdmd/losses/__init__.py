"""Pure loss functions: tensors in, tensors out; no configs, no IO."""
