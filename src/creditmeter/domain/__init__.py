"""Domain rules: burn-down order, rates and rounding, validation, keys and roles."""
